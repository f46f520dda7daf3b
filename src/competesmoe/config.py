"""Dataclass configs with validation, YAML/dict round-trips and `key=value` overrides.

Every config in the library is a dataclass deriving from `Config`. Nested configs are plain
dataclass fields. `apply_overrides(cfg, ["competition.kappa=silu", "top_k=4"])` sets leaves by
dotted path; a bare leaf name (`kappa=silu`) is accepted when it is unique in the tree.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import CompeteSMoEError

C = TypeVar("C", bound="Config")


class ConfigError(CompeteSMoEError, ValueError):
    """A configuration value is invalid; the message names the field and the problem."""


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def check_choice(name: str, value: Any, choices: typing.Iterable[Any]) -> None:
    choices = tuple(choices)
    check(value in choices, f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")


@dataclasses.dataclass
class Config:
    def __post_init__(self) -> None:
        _check_types(self)
        self.validate()

    def validate(self) -> None:  # overridden by subclasses
        pass

    # --- dict / YAML -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        check(isinstance(data, dict), f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        check(not unknown, f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(names)}")
        kwargs = {}
        for key, value in data.items():
            sub = _config_type(hints[key])
            kwargs[key] = sub.from_dict(value) if sub is not None and isinstance(value, dict) else value
        return cls(**kwargs)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls: type[C], path: str | Path) -> C:
        return cls.from_dict(read_yaml(path))

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)


def _config_type(hint: Any) -> type[Config] | None:
    """The Config subclass inside a type hint such as `RouterConfig` or `RouterConfig | None`."""
    candidates = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
    for c in candidates:
        if isinstance(c, type) and issubclass(c, Config):
            return c
    return None


def _leaf_paths(cfg: Config, prefix: str = "") -> dict[str, tuple[Config, str]]:
    out: dict[str, tuple[Config, str]] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, Config):
            out.update(_leaf_paths(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = (cfg, f.name)
    return out


_TYPE_NAMES = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}


def _coerce(value: Any, hint: Any) -> Any:
    """`value` as the field type `hint` (int -> float widening only); ConfigError on a mismatch."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
    if value is None:
        check(type(None) in args, "expected " + " or ".join(_TYPE_NAMES.get(a, getattr(a, "__name__", str(a)))
                                                            for a in args) + ", got null")
        return None
    for t in args:
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is str and isinstance(value, str):
            return value
        if isinstance(t, type) and issubclass(t, Config) and isinstance(value, t):
            return value
        if t is Any or typing.get_origin(t) in (dict, list) or t in (dict, list):
            return value
    names = [_TYPE_NAMES.get(a, getattr(a, "__name__", str(a))) for a in args if a is not type(None)]
    raise ConfigError(f"expected {' or '.join(names)}{' or null' if type(None) in args else ''}, got {value!r}")


def _check_types(cfg: Config) -> None:
    """Check (and widen int -> float) every field against its type hint, naming the field on error."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        try:
            object.__setattr__(cfg, f.name, _coerce(getattr(cfg, f.name), hints[f.name]))
        except ConfigError as e:
            raise ConfigError(f"{type(cfg).__name__}.{f.name}: {e}") from None


def _parse_value(text: str, hint: Any) -> Any:
    """A command-line value: YAML syntax, then checked against the field's type."""
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    plain = [a for a in (typing.get_args(hint) or (hint,)) if a is not type(None)]
    if plain == [str] and value is not None:
        return text  # a string field takes the text as it is ("3", "true")
    if isinstance(value, str) and float in plain:
        try:  # YAML 1.1 reads "5e-3" as a string
            value = float(value)
        except ValueError:
            pass
    return _coerce(value, hint)


def apply_overrides(cfg: C, overrides: typing.Iterable[str] | dict[str, Any]) -> C:
    """Return a validated copy of `cfg` with `path=value` overrides applied."""
    items = overrides.items() if isinstance(overrides, dict) else [_split(o) for o in overrides]
    cfg = _deepcopy(cfg)
    leaves = _leaf_paths(cfg)
    for key, raw in items:
        path = _resolve(key, leaves)
        owner, name = leaves[path]
        hint = typing.get_type_hints(type(owner))[name]
        try:
            value = _parse_value(raw, hint) if isinstance(raw, str) else _coerce(raw, hint)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        object.__setattr__(owner, name, value)
    _revalidate(cfg)
    return cfg


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: a nested config mapping as dotted-path overrides."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file; ConfigError naming the file when it cannot be read or is not a mapping."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    check(isinstance(data or {}, dict), f"config {path}: expected a mapping at the top level")
    return data or {}


def _split(item: str) -> tuple[str, str]:
    check("=" in item, f"override {item!r} must look like key=value")
    key, value = item.split("=", 1)
    return key.strip(), value.strip()


def _resolve(key: str, leaves: dict[str, Any]) -> str:
    if key in leaves:
        return key
    matches = [p for p in leaves if p.endswith("." + key)]
    check(len(matches) == 1, f"unknown config key {key!r}" if not matches
          else f"ambiguous config key {key!r}: use one of {matches}")
    return matches[0]


def _deepcopy(cfg: C) -> C:
    return type(cfg).from_dict(cfg.to_dict())


def _revalidate(cfg: Config) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, Config):
            _revalidate(value)
    _check_types(cfg)
    cfg.validate()


# ------------------------------------------------------------------------------------------------
# The MoE layer (Sections 2.1-2.3.1, baselines of Section 5.1) and the competition schedule (Section 2.3.2, Appendix C)
# ------------------------------------------------------------------------------------------------
ROUTERS = ("smoe", "xmoe", "pcosine", "moeut", "sharede_v2", "sharede_v3", "competesmoe")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "quick_gelu", "swiglu", "geglu", "geglu_tanh")  # moe/activations.py
KAPPAS = ("softplus", "silu", "sigmoid", "relu", "softmax", "norm")
BALANCE_LOSSES = ("switch", "entropy", "none")
BACKENDS = ("auto", "grouped_mm", "loop", "triton")


@dataclasses.dataclass
class RouterConfig(Config):
    """Options of the router policies (Section 2.1, baselines of Section 5.1); each router reads the ones it names."""
    temperature: float = 0.3        # xmoe, pcosine: logits = cos / temperature
    proj_dim: int | None = None     # xmoe, pcosine: d_r of the projection P (None: n_routed // 2)
    cosine_eps: float = 0.1         # pcosine: ε in <z, e> / ((‖z‖+ε)(‖e‖+ε))
    normalize: bool = False         # moeut: renormalise σ(h)[I] to sum to 1
    n_shared: int = 1               # sharede_*: always-active experts, taken from the same budget
    shared_mix: float | None = None  # sharede_*: y = mix·shared + (1−mix)·routed (0.5 for upcycling)
    routed_scale: float = 1.0       # sharede_v3: scale of the routed weights
    bias_balance: bool = False      # sharede_v3: auxiliary-loss-free balancing bias
    bias_rate: float = 1e-3         # sharede_v3: u in b_i += u·sign(mean_load − load_i)

    def validate(self) -> None:
        check(self.temperature > 0, f"router temperature must be > 0, got {self.temperature}")
        check(self.proj_dim is None or self.proj_dim >= 1, f"proj_dim must be >= 1, got {self.proj_dim}")
        check(self.cosine_eps >= 0, f"cosine_eps must be >= 0, got {self.cosine_eps}")
        check(self.n_shared >= 1, f"n_shared must be >= 1, got {self.n_shared}")
        check(self.shared_mix is None or 0.0 <= self.shared_mix <= 1.0,
              f"shared_mix must be in [0, 1], got {self.shared_mix}")
        check(self.routed_scale > 0, f"routed_scale must be > 0, got {self.routed_scale}")
        check(self.bias_rate >= 0, f"bias_rate must be >= 0, got {self.bias_rate}")


@dataclasses.dataclass
class CompetitionConfig(Config):
    """The competition mechanism (Section 2.2) and its router losses (Section 2.3.1, Eqs. (2)-(3))."""
    kappa: str = "softplus"         # affinity activation κ (Eq. (13)); "norm" is Eq. (14)
    distill: str = "paper"          # "paper": t = s_C (sparse winners); "reference": t = softmax(a)
    distill_target: str = "dense"   # the router's side of L_D (Eq. (2)): "dense" = softmax over all N logits
                                    # (the released code); "topk" = s_R = σ(TopK_{-∞}(h)) as Section 2.1 defines it
    alpha: float = 0.1              # Eq. (2) weight on the winners' squared errors
    gamma: float = 0.01             # weight of L_D in Eq. (5)
    beta: float = 0.005             # weight of L_div in Eq. (5)
    detach_router_off_competition: bool = False  # router gets no task gradient after warm-up
    competition_forward: bool = True  # False: output uses the router even on competition steps
    router_diversity: bool = False    # β·L_div on the router's own top-K, any router without competition
                                      # (Table 7's "diversity loss without competition" with router smoe)
    router_diversity_steps: str = "scheduled"  # "scheduled": only where the schedule Λ fires (ω of the steps
                                      # after warm-up, the dose of the released ablation; the paper is
                                      # silent); "all": every training step (this library's former reading)
    chunk_tokens: int | None = None   # tokens per chunk of the all-expert pass (None: automatic)
    recompute_winners: bool = True    # backward recomputes the winners' outputs (one more sparse forward)
                                      # instead of keeping [T, K, D] per competing layer
    eps: float = 1e-6                 # affinities are clamped to >= eps before normalising

    def validate(self) -> None:
        check_choice("kappa", self.kappa, KAPPAS)
        check_choice("distill", self.distill, ("paper", "reference"))
        check_choice("distill_target", self.distill_target, ("dense", "topk"))
        check_choice("router_diversity_steps", self.router_diversity_steps, ("scheduled", "all"))
        for name in ("alpha", "gamma", "beta"):
            check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        check(self.chunk_tokens is None or self.chunk_tokens >= 1,
              f"chunk_tokens must be >= 1, got {self.chunk_tokens}")
        check(self.eps > 0, f"competition eps must be > 0, got {self.eps}")


@dataclasses.dataclass
class LossConfig(Config):
    """Load-balancing and stability losses (Section 5.1, Appendix I), already weighted in `MoEOutput.aux_loss`."""
    balance: str = "switch"
    balance_coef: float = 0.01
    zloss_coef: float = 0.0

    def validate(self) -> None:
        check_choice("balance", self.balance, BALANCE_LOSSES)
        check(self.balance_coef >= 0, f"balance_coef must be >= 0, got {self.balance_coef}")
        check(self.zloss_coef >= 0, f"zloss_coef must be >= 0, got {self.zloss_coef}")


@dataclasses.dataclass
class MoEConfig(Config):
    """One MoE layer. `n_experts` and `top_k` count shared experts too (sharede_*: README, router table)."""
    d_model: int
    d_expert: int
    n_experts: int
    top_k: int
    router: str = "smoe"
    activation: str = "gelu"
    bias: bool = False              # expert biases
    router_bias: bool = False       # bias in the router's linear map
    backend: str = "auto"           # expert dispatch (Experts.path): grouped_mm, the loop on CPU in fp32, or triton
    d_out: int | None = None        # experts' output width (None: d_model); a LLaVA connector maps vision -> text width
    router_opts: RouterConfig = dataclasses.field(default_factory=RouterConfig)
    competition: CompetitionConfig = dataclasses.field(default_factory=CompetitionConfig)
    losses: LossConfig = dataclasses.field(default_factory=LossConfig)

    @property
    def out_dim(self) -> int:
        return self.d_model if self.d_out is None else self.d_out

    @property
    def n_shared(self) -> int:
        return self.router_opts.n_shared if self.router.startswith("sharede") else 0

    @property
    def n_routed(self) -> int:
        return self.n_experts - self.n_shared

    @property
    def k_routed(self) -> int:
        return self.top_k - self.n_shared

    def validate(self) -> None:
        for name in ("d_model", "d_expert", "n_experts", "top_k"):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name} must be an integer >= 1, got {v!r}")
        check(self.d_out is None or (isinstance(self.d_out, int) and not isinstance(self.d_out, bool) and self.d_out >= 1),
              f"d_out must be an integer >= 1 or null, got {self.d_out!r}")
        check_choice("router", self.router, ROUTERS)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("backend", self.backend, BACKENDS)
        check(self.top_k <= self.n_experts, f"top_k={self.top_k} > n_experts={self.n_experts}: K must be <= N")
        if self.router.startswith("sharede"):
            check(self.top_k > self.n_shared,
                  f"{self.router}: top_k={self.top_k} must exceed n_shared={self.n_shared} (K - n_shared routed per token)")
            check(self.n_routed >= self.k_routed, f"{self.router}: not enough routed experts")


@dataclasses.dataclass
class ScheduleConfig(Config):
    """The offline competition schedule Λ[l, t] (Sections 2.3.2 and 2.4, Appendix C)."""
    omega: float = 0.07             # per-layer, per-step Bernoulli probability
    a_max: int = 3                  # at most this many competing layers per optimizer step
    warmup: float = 0.0             # fraction of the steps that never compete
    seed: int = 42

    def validate(self) -> None:
        check(0.0 <= self.omega <= 1.0, f"omega must be in [0, 1], got {self.omega}")
        check(isinstance(self.a_max, int) and self.a_max >= 1, f"a_max must be an integer >= 1, got {self.a_max}")
        check(0.0 <= self.warmup < 1.0, f"warmup must be in [0, 1), got {self.warmup}")
