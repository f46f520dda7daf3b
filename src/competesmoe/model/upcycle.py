"""Sparse upcycling: a trained dense model -> an MoE whose experts start as copies of its MLPs.

The paper's headline setting (Section 5.1, Appendix I.1, after Komatsuzaki et al., 2023): every MLP of a
dense model is copied into N experts, a fresh router is added (N(0, 0.02), seed 42) and the MoE is
fine-tuned with the chosen router. Two kinds of dense model are handled:

* Hugging Face models (`upcycle(model, spec)`): the original architecture is kept and each chosen MLP is
  swapped for an `UpcycledMLP` (a `competesmoe.MoE` behind the family's MLP interface). Families are
  recognised by the MLP's module structure, not by name: `gate_proj`/`up_proj`/`down_proj` (Llama,
  Mistral, Qwen2/3), fused `gate_up_proj`/`down_proj` (Phi-3), `c_fc`/`c_proj` Conv1D (GPT-2).
  `targets` says which MLPs: "language" (the decoder's, `get_decoder()`), and for a LLaVA-style VLM
  "vision" (the vision encoder's `fc1`/`fc2` MLPs, CLIP and SigLIP) and "connector" (the two-layer
  `multi_modal_projector`, each expert a copy of the whole projector, vision width -> text width). The
  default for a VLM is vision,connector: the paper's 5.1 B model (Table 1, Appendix I.1) upcycles the
  vision encoder and the connector and keeps the language model dense.
  The model becomes an instance of a subclass of its own class (`Upcycled<Class>`), whose config has
  `model_type="competesmoe_upcycled"` and a `competesmoe` entry; after `import competesmoe`,
  `AutoModelForCausalLM.from_pretrained(OUT)` (`AutoModelForImageTextToText` for a VLM) rebuilds it.
* Our own `MoETransformer` trained with `model.dense=true` (`upcycle_transformer`): a new
  `MoETransformer` with the MoE config, same weights elsewhere.

Step 0 (weights copied exactly, `noise=0`): y = Σ_k w_k g(x) = g(x) whenever the routing weights sum to 1,
i.e. for smoe, competesmoe, xmoe, pcosine, sharede_v2, moeut with `normalize=True` and sharede_v3 with
`routed_scale=1`; the shared experts hold the dense MLP too, so any `shared_mix` gives g(x) (0.5 is set).
Otherwise y = c(x)·g(x): moeut c = Σ_{k∈I} σ(h_k), sharede_v3 c = mix + (1 − mix)·routed_scale.
Shapes: D d_model, H the dense MLP's width, N experts.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..config import (ROUTERS, CompetitionConfig, Config, ConfigError, LossConfig, MoEConfig, RouterConfig, check,
                      check_choice)
from ..moe import MoE
from ..moe import activations
from ..moe.experts import Experts
from .transformer import MoETransformer

MODEL_TYPE = "competesmoe_upcycled"
TARGETS = ("vision", "connector", "language")
ROUTER_STD = 0.02  # Appendix I.1: the router is initialised N(0, 0.02) (GPT-2's init) with seed 42


class UpcycleError(ConfigError):
    """The model cannot be upcycled; the message names what is missing."""


@dataclass
class UpcycleConfig(Config):
    """How to turn a dense model into an MoE (defaults: the paper's VIT setting, Appendix I.1)."""
    experts: int = 4
    top_k: int = 2
    router: str = "competesmoe"
    layers: str = "all"             # "all" or comma-separated layer indices, e.g. "0,2,4" (of each layered target)
    # what becomes MoE: "vision" (the vision encoder's MLPs), "connector" (a VLM's projector), "language"
    # (the decoder's MLPs), comma-separated; "auto": vision,connector for a VLM (Appendix I.1's
    # co-upcycling, as CuMo/LibMoE), language for a causal LM
    targets: str = "auto"
    noise: float = 0.0              # std of Gaussian noise on each expert copy, relative to the weight's std
    seed: int = 42                  # router initialisation (and noise)
    router_bias: bool = False
    backend: str = "auto"
    router_opts: RouterConfig = field(default_factory=RouterConfig)
    competition: CompetitionConfig = field(default_factory=CompetitionConfig)
    # upcycling / fine-tuning: switch balance 0.01 + z-loss 0.001 (Appendix I.1, Table 10)
    losses: LossConfig = field(default_factory=lambda: LossConfig(balance="switch", balance_coef=0.01,
                                                                  zloss_coef=0.001))

    def validate(self) -> None:
        check(isinstance(self.experts, int) and self.experts >= 2,   # one expert is the dense MLP, not an MoE
              f"experts must be an integer >= 2 (an MoE), got {self.experts!r}")
        check(isinstance(self.top_k, int) and 1 <= self.top_k <= self.experts,
              f"top_k must be an integer in [1, experts={self.experts}], got {self.top_k!r}")
        check_choice("router", self.router, ROUTERS)
        check(self.noise >= 0, f"noise must be >= 0, got {self.noise}")
        self.layer_indices(None)
        self.target_list()

    def target_list(self) -> list[str] | None:
        """The targets in their fixed order (vision, connector, language); None for "auto"."""
        text = str(self.targets).replace(" ", "")
        if text == "auto":
            return None
        names = [t for t in text.split(",") if t]
        bad = [t for t in names if t not in TARGETS]
        check(bool(names) and not bad, f"targets must be 'auto' or a comma-separated subset of {','.join(TARGETS)}, "
                                       f"got {self.targets!r}")
        return [t for t in TARGETS if t in names]

    def layer_indices(self, n_layers: int | None, what: str = "decoder layers") -> list[int] | None:
        """The layers to upcycle (None with `n_layers=None` and "all")."""
        text = str(self.layers).replace(" ", "")
        if text == "all":
            return None if n_layers is None else list(range(n_layers))
        try:
            idx = sorted({int(t) for t in text.split(",") if t})
        except ValueError:
            raise ConfigError(f"layers must be 'all' or comma-separated integers such as 0,2,4, got {self.layers!r}") from None
        check(bool(idx), f"layers={self.layers!r} names no layer")
        if n_layers is not None:
            bad = [i for i in idx if not 0 <= i < n_layers]
            check(not bad, f"layers {bad} out of range: the model has {n_layers} {what} (0..{n_layers - 1})")
        return idx

    def moe_config(self, d_model: int, d_expert: int, activation: str, bias: bool, d_out: int | None = None) -> MoEConfig:
        opts = self.router_opts
        if self.router.startswith("sharede") and opts.shared_mix is None:
            opts = dataclasses.replace(opts, shared_mix=0.5)  # README (shared_mix): the upcycled model equals the dense one
        widths = {} if d_out is None or d_out == d_model else {"d_out": d_out}   # a connector maps D_in -> D_out
        return MoEConfig(d_model=d_model, d_expert=d_expert, n_experts=self.experts, top_k=self.top_k,
                         router=self.router, activation=activation, bias=bias, router_bias=self.router_bias,
                         backend=self.backend, router_opts=opts, competition=self.competition, losses=self.losses,
                         **widths)


# --- the dense MLP, read from its module structure ----------------------------------------------------
@dataclass
class DenseMLP:
    """A dense MLP y = W2 φ(W1 x + b1) + b2 (gated: W2 (φ(G x) ⊙ U x), W1 = [G | U]), weights [out, in]."""
    w1: torch.Tensor                # [H, D], or [2H, D] = [gate | up] when gated
    b1: torch.Tensor | None
    w2: torch.Tensor                # [D, H]
    b2: torch.Tensor | None
    act: Callable                   # the model's own activation module (exact step-0 equality)
    gated: bool
    dropout: nn.Module | None = None  # applied to the MLP output (GPT-2)

    @property
    def width(self) -> int:
        return self.w2.shape[1]

    @property
    def d_in(self) -> int:
        return self.w1.shape[1]

    @property
    def d_out(self) -> int:
        return self.w2.shape[0]


def _act_of(mlp: nn.Module) -> Callable | None:
    return next((getattr(mlp, n) for n in ("act_fn", "activation_fn", "act") if callable(getattr(mlp, n, None))), None)


def _linears(mlp: nn.Module, names: tuple[str, ...], kind: type) -> list[nn.Module] | None:
    mods = [getattr(mlp, n, None) for n in names]
    return mods if all(isinstance(m, kind) for m in mods) else None


def _cat_bias(*mods: nn.Module) -> torch.Tensor | None:
    biases = [m.bias for m in mods]
    return None if any(b is None for b in biases) else torch.cat([b.detach() for b in biases])


def _gated(mlp: nn.Module) -> DenseMLP | None:
    """Llama, Mistral, Qwen2/3: down(act(gate(x)) * up(x))."""
    found = _linears(mlp, ("gate_proj", "up_proj", "down_proj"), nn.Linear)
    if found is None:
        return None
    gate, up, down = found
    w1 = torch.cat([gate.weight.detach(), up.weight.detach()])
    return DenseMLP(w1, _cat_bias(gate, up), down.weight.detach(),
                    None if down.bias is None else down.bias.detach(), _act_of(mlp), gated=True)


def _fused(mlp: nn.Module) -> DenseMLP | None:
    """Phi-3: gate_up_proj holds [gate | up] rows; down(up * act(gate))."""
    found = _linears(mlp, ("gate_up_proj", "down_proj"), nn.Linear)
    if found is None:
        return None
    gate_up, down = found
    return DenseMLP(gate_up.weight.detach(), None if gate_up.bias is None else gate_up.bias.detach(),
                    down.weight.detach(), None if down.bias is None else down.bias.detach(), _act_of(mlp), gated=True)


def _conv1d(mlp: nn.Module) -> DenseMLP | None:
    """GPT-2: Conv1D weights are stored [in, out]; dropout(c_proj(act(c_fc(x))))."""
    from transformers.pytorch_utils import Conv1D
    found = _linears(mlp, ("c_fc", "c_proj"), Conv1D)
    if found is None:
        return None
    fc, proj = found
    drop = getattr(mlp, "dropout", None)
    return DenseMLP(fc.weight.detach().T, fc.bias.detach(), proj.weight.detach().T, proj.bias.detach(),
                    _act_of(mlp), gated=False, dropout=drop if isinstance(drop, nn.Dropout) else None)


def _two_linears(first: str, second: str) -> Callable[[nn.Module], DenseMLP | None]:
    def adapter(mlp: nn.Module) -> DenseMLP | None:
        found = _linears(mlp, (first, second), nn.Linear)
        if found is None:
            return None
        a, b = found
        return DenseMLP(a.weight.detach(), None if a.bias is None else a.bias.detach(), b.weight.detach(),
                        None if b.bias is None else b.bias.detach(), _act_of(mlp), gated=False)
    adapter.__doc__ = f"{second}(act({first}(x))), nn.Linear"
    return adapter


_fc = _two_linears("fc1", "fc2")                    # CLIP / SigLIP vision encoder MLPs (activation_fn)
_projector = _two_linears("linear_1", "linear_2")   # LLaVA's multi_modal_projector (act): vision width -> text width

ADAPTERS: tuple[Callable[[nn.Module], DenseMLP | None], ...] = (_gated, _fused, _conv1d)
EXPECTED = ("gate_proj/up_proj/down_proj nn.Linear (Llama, Mistral, Qwen2/3), gate_up_proj/down_proj nn.Linear "
            "(Phi-3) or c_fc/c_proj Conv1D (GPT-2)")
VISION_ADAPTERS, VISION_EXPECTED = (_fc,), "fc1/fc2 nn.Linear with activation_fn (CLIP, SigLIP)"
CONNECTOR_ADAPTERS, CONNECTOR_EXPECTED = (_projector,), "linear_1/linear_2 nn.Linear with act (LLaVA's two-layer MLP)"


def read_dense_mlp(mlp: nn.Module, where: str, adapters: tuple = ADAPTERS, expected: str = EXPECTED) -> DenseMLP:
    """The dense MLP's weights, or an `UpcycleError` naming what is missing."""
    for adapter in adapters:
        dense = adapter(mlp)
        if dense is not None:
            if dense.act is None:
                raise UpcycleError(f"{where} ({type(mlp).__name__}) has the MLP projections but no activation "
                                   f"attribute (act_fn, activation_fn or act)")
            return dense
    children = ", ".join(f"{n}: {type(m).__name__}" for n, m in mlp.named_children()) or "none"
    raise UpcycleError(f"cannot upcycle {where} ({type(mlp).__name__}): expected {expected}; it has {children}")


def _layer_list(root: nn.Module) -> nn.ModuleList | None:
    for module in root.modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(hasattr(l, "mlp") for l in module):
            return module
    return None


def _holder(model: nn.Module, name: str) -> tuple[nn.Module, nn.Module] | None:
    """(parent, submodule) of the first submodule held under attribute `name` (LLaVA: model.vision_tower,
    model.multi_modal_projector)."""
    for module in model.modules():
        found = getattr(module, name, None)
        if isinstance(found, nn.Module):
            return module, found
    return None


def _part(model: nn.Module, name: str) -> nn.Module | None:
    held = _holder(model, name)
    return None if held is None else held[1]


def vision_tower(model: nn.Module) -> nn.Module | None:
    return _part(model, "vision_tower")


def is_vlm(model: nn.Module) -> bool:
    return vision_tower(model) is not None


def param_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """(name, parameter) per module group: vision (the `vision_tower`), connector (the `multi_modal_projector`)
    and language (everything else: the language model and its head). A causal LM is all language."""
    ids = {g: {id(p) for p in part.parameters()} for g, n in (("vision", "vision_tower"),
                                                              ("connector", "multi_modal_projector"))
           if (part := _part(model, n)) is not None}
    out: dict[str, list] = {t: [] for t in TARGETS}
    for name, p in model.named_parameters():
        out[next((g for g, s in ids.items() if id(p) in s), "language")].append((name, p))
    return out


def freeze(model: nn.Module, trainable: list[str]) -> dict[str, int]:
    """requires_grad = (the parameter's group is in `trainable`); returns the parameters per group and how
    many train. A group the model does not have (vision or connector of a causal LM) is an error."""
    groups = param_groups(model)
    absent = [g for g in trainable if not groups[g]]
    if absent:
        raise UpcycleError(f"trainable {','.join(absent)}: {type(model).__name__} has no such part (vision = "
                           f"`vision_tower`, connector = `multi_modal_projector`)")
    counts = {}
    for group, params in groups.items():
        for _, p in params:
            p.requires_grad_(group in trainable)
        counts[group] = sum(p.numel() for _, p in params)
    counts["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return counts


def vision_layers(model: nn.Module) -> nn.ModuleList:
    """The vision encoder's layer list: the ModuleList inside `vision_tower` whose layers all have an `mlp`."""
    tower = vision_tower(model)
    if tower is None:
        raise UpcycleError(f"targets vision: {type(model).__name__} has no vision encoder (no `vision_tower` module)")
    layers = _layer_list(tower)
    if layers is None:
        raise UpcycleError(f"targets vision: the vision encoder ({type(tower).__name__}) has no list of layers with an "
                           f"`mlp` module (expected e.g. vision_model.encoder.layers[i].mlp, as CLIP and SigLIP)")
    return layers


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layer list: the ModuleList inside `get_decoder()` whose layers all have an `mlp`."""
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else model
    layers = _layer_list(decoder)
    if layers is not None:
        return layers
    raise UpcycleError(f"cannot upcycle {type(model).__name__}: its decoder ({type(decoder).__name__}) has no list of "
                       f"layers with an `mlp` module (expected e.g. model.layers[i].mlp or transformer.h[i].mlp)")


# --- the MoE that replaces an MLP --------------------------------------------------------------------
class UpcycledMoE(MoE):
    """An `MoE` whose experts (and shared experts) use the dense model's own activation module: forward calls
    it, and every dispatch path takes its derivative from the same `Activation` (`moe.activations.of`)."""

    def __init__(self, cfg: MoEConfig, act: Callable, gated: bool) -> None:
        super().__init__(cfg)
        phi = activations.of(act, gated)
        self.experts = Experts(cfg.n_routed, cfg.d_model, cfg.d_expert, phi, cfg.bias, cfg.backend, cfg.d_out)
        if self.shared is not None:
            self.shared.inner = Experts(1, cfg.d_model, cfg.n_shared * cfg.d_expert, phi, cfg.bias, "loop", cfg.d_out)


class UpcycledMLP(nn.Module):
    """The family's MLP interface (`mlp(hidden_states) -> hidden_states`) around an MoE layer.

    The layer's `MoEOutput` of the last call is kept in `output` for the model's auxiliary loss."""

    def __init__(self, moe: MoE, dropout: nn.Module | None = None) -> None:
        super().__init__()
        self.moe = moe
        self.dropout = dropout if dropout is not None else nn.Identity()
        self.output = None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.output = self.moe(hidden_states)
        return self.dropout(self.output.y)


@torch.no_grad()
def fill_moe(moe: MoE, dense: DenseMLP, generator: torch.Generator, noise: float = 0.0) -> None:
    """Experts := copies of the dense MLP (+ relative noise); shared experts := the dense MLP; router := N(0, 0.02).

    A shared FFN of width s·H (s = n_shared) holds s copies of the hidden units with W2/s, so it equals g(x).
    Random numbers come from `generator` (on CPU) in a fixed order: router, then the expert noise."""
    ex = moe.experts
    for name, p in moe.router.named_parameters():
        if p.dim() < 2:
            p.zero_()
            continue
        t = torch.empty(p.shape, dtype=torch.float32)
        if name == "expert_emb":  # xmoe / pcosine expert embeddings keep their orthogonal design
            nn.init.orthogonal_(t, generator=generator)
        else:
            t.normal_(0.0, ROUTER_STD, generator=generator)
        p.copy_(t)
    pairs = [(ex.w1, dense.w1), (ex.w2, dense.w2), (ex.b1, dense.b1), (ex.b2, dense.b2)]
    for param, src in pairs:
        if param is None:
            continue
        param.copy_(src.to(param)[None].expand_as(param))
        if noise > 0 and src.dim() == 2:
            std = float(src.float().std())
            param.add_((torch.randn(param.shape, generator=generator) * noise * std).to(param))
    if moe.shared is not None:
        s, inner = moe.cfg.n_shared, moe.shared.inner
        H = dense.width
        if dense.gated:
            w1 = torch.cat([dense.w1[:H]] * s + [dense.w1[H:]] * s)
            b1 = None if dense.b1 is None else torch.cat([dense.b1[:H]] * s + [dense.b1[H:]] * s)
        else:
            w1 = torch.cat([dense.w1] * s)
            b1 = None if dense.b1 is None else torch.cat([dense.b1] * s)
        inner.w1[0].copy_(w1)
        inner.w2[0].copy_(torch.cat([dense.w2] * s, dim=1) / s)
        if inner.b1 is not None:
            inner.b1[0].copy_(b1)
            inner.b2[0].copy_(dense.b2)


def _check_bias(dense: DenseMLP, where: str) -> bool:
    if (dense.b1 is None) != (dense.b2 is None):
        raise UpcycleError(f"{where}: MLPs with a bias on only one projection are not supported")
    return dense.b1 is not None


# --- Hugging Face models: the architecture with its MLPs swapped -------------------------------------
class _UpcycledMixin:
    """Placed before the dense class: builds the dense architecture, then swaps the chosen MLPs.

    `forward` adds the MoE auxiliary loss (summed over MoE layers, each layer's losses already weighted)
    to `loss` when labels are given and `config.include_aux_loss` is true (`include_aux_loss=` overrides
    it per call), and returns it as `aux_loss`; the layers' `MoEOutput`s are kept in `moe_outputs`."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        saved = dict(config.competesmoe["upcycle"])
        saved.setdefault("targets", "language")   # saved before targets existed: the decoder's MLPs only
        swap_mlps(self, UpcycleConfig.from_dict(saved), copy=False)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        from .hf import realign_parameters
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded   # output_loading_info=True: (model, info)
        realign_parameters(model)  # memory-mapped weights may be unaligned: grouped_mm needs 16-byte alignment
        with torch.no_grad():  # non-persistent buffers (running router loads) are zeros at construction
            for mlp in [m for m in model.modules() if isinstance(m, UpcycledMLP)]:
                for module in mlp.modules():
                    for name in module._non_persistent_buffers_set:
                        getattr(module, name).zero_()
        return loaded

    def forward(self, *args: Any, labels: torch.Tensor | None = None, include_aux_loss: bool | None = None,
                **kwargs: Any):
        out = super().forward(*args, labels=labels, **kwargs)
        mlps = [m for m in self.modules() if isinstance(m, UpcycledMLP)]
        self.moe_outputs = [m.output for m in mlps if m.output is not None]
        for m in mlps:
            m.output = None
        dev = out.logits.device
        aux = (torch.stack([o.aux_loss.to(dev) for o in self.moe_outputs]).sum() if self.moe_outputs
               else out.logits.new_zeros((), dtype=torch.float32))
        include = getattr(self.config, "include_aux_loss", True) if include_aux_loss is None else include_aux_loss
        if labels is not None and include and out.loss is not None:
            out["loss"] = out.loss + aux
        return with_aux_loss(type(out))(**out, aux_loss=aux)


@functools.cache
def with_aux_loss(output_cls: type) -> type:
    """`output_cls` with an `aux_loss` field. A key added to a `ModelOutput` is not enough: DDP (and
    torch.compile) rebuild outputs from their dataclass fields, and transformers' causal-LM / LLaVA outputs
    have no `aux_loss` field (a subclass is registered with torch's pytree like any `ModelOutput`)."""
    if "aux_loss" in {f.name for f in dataclasses.fields(output_cls)}:
        return output_cls
    return dataclasses.make_dataclass(f"{output_cls.__name__}WithAuxLoss",
                                      [("aux_loss", torch.Tensor | None, field(default=None))],
                                      bases=(output_cls,), namespace={"__module__": __name__})


def _inherit_key_mapping(model_cls: type, base_cfg: type, name: str) -> None:
    """The base's checkpoint key mapping, under the upcycled class's name.

    transformers 5 renames legacy checkpoint keys while loading (LLaVA: `language_model.lm_head.weight` ->
    `lm_head.weight`, `language_model.model.*` -> `model.language_model.*`, ...) by looking the mapping up
    under the model's class name, then its `model_type`; a model loaded with such a mapping is saved with
    the legacy keys again. Our class name and `competesmoe_upcycled` are unknown to that table, so without
    this an untied LLaVA head saved by an upcycled model would not be found when it is loaded back."""
    try:
        from transformers.conversion_mapping import (get_checkpoint_conversion_mapping,
                                                     register_checkpoint_conversion_mapping)
    except ImportError:  # a transformers without key mappings loads and saves keys as they are
        return
    mapping = get_checkpoint_conversion_mapping(model_cls.__name__) or get_checkpoint_conversion_mapping(base_cfg.model_type)
    if mapping:
        register_checkpoint_conversion_mapping(name, mapping, overwrite=True)


@functools.cache
def upcycled_class(model_cls: type) -> type:
    """`Upcycled<Class>` (and its config class), registered with the Auto classes that know `model_cls`."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    base_cfg = model_cls.config_class
    ignore = list(getattr(base_cfg, "keys_to_ignore_at_inference", [])) + ["aux_loss"]
    cfg_cls = type(f"Upcycled{base_cfg.__name__}", (base_cfg,),
                   {"model_type": MODEL_TYPE, "keys_to_ignore_at_inference": ignore, "__module__": __name__})

    def forward(self, *args: Any, **kwargs: Any):
        return _UpcycledMixin.forward(self, *args, **kwargs)

    # transformers' Trainer keeps only the dataset columns that forward's signature names: show the base's
    sig = inspect.signature(model_cls.forward)
    extra = inspect.Parameter("include_aux_loss", inspect.Parameter.KEYWORD_ONLY, default=None)
    params = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD]
    params += [extra] + [p for p in sig.parameters.values() if p.kind == p.VAR_KEYWORD]
    forward.__signature__ = sig.replace(parameters=params)
    new_cls = type(f"Upcycled{model_cls.__name__}", (_UpcycledMixin, model_cls),
                   {"config_class": cfg_cls, "forward": forward, "__module__": __name__})
    _inherit_key_mapping(model_cls, base_cfg, new_cls.__name__)
    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        mapping = auto._model_mapping
        if base_cfg in mapping and mapping[base_cfg] is model_cls:
            auto.register(cfg_cls, new_cls, exist_ok=True)
    return new_cls


def resolve_targets(model: nn.Module, spec: UpcycleConfig) -> list[str]:
    """`spec`'s targets; "auto": vision,connector for a VLM (Appendix I.1, Table 1), language otherwise."""
    chosen = spec.target_list()
    if chosen is None:
        return ["vision", "connector"] if is_vlm(model) else ["language"]
    return chosen


def sites(model: nn.Module, spec: UpcycleConfig, targets: list[str]) -> list[tuple[str, nn.Module, str, DenseMLP]]:
    """(where, parent, attribute, dense MLP) of every MLP to upcycle, in the router-seeding order:
    vision layers, connector, decoder layers. Errors name the target and what was found."""
    found = []
    if "vision" in targets:
        layers = vision_layers(model)
        for i in spec.layer_indices(len(layers), "vision encoder layers"):
            where = f"vision layer {i} mlp"
            found.append((where, layers[i], "mlp", read_dense_mlp(layers[i].mlp, where, VISION_ADAPTERS, VISION_EXPECTED)))
    if "connector" in targets:
        held = _holder(model, "multi_modal_projector")
        if held is None:
            raise UpcycleError(f"targets connector: {type(model).__name__} has no connector (no `multi_modal_projector` "
                               f"module, as LLaVA has)")
        parent, projector = held
        found.append(("connector", parent, "multi_modal_projector",
                      read_dense_mlp(projector, "connector", CONNECTOR_ADAPTERS, CONNECTOR_EXPECTED)))
    if "language" in targets:
        layers = decoder_layers(model)
        for i in spec.layer_indices(len(layers)):
            where = f"decoder layer {i} mlp"
            found.append((where, layers[i], "mlp", read_dense_mlp(layers[i].mlp, where)))
    return found


def swap_mlps(model: nn.Module, spec: UpcycleConfig, copy: bool = True,
              targets: list[str] | None = None) -> list[UpcycledMLP]:
    """Replace the chosen MLPs by `UpcycledMLP`s (with the dense weights if `copy`).

    The MoE layers are built on the dense weights' device, so a model on the meta device stays there
    (`competesmoe upcycle --dry-run` counts parameters without allocating them)."""
    targets = resolve_targets(model, spec) if targets is None else targets
    generator = torch.Generator().manual_seed(spec.seed)
    swapped = []
    for where, parent, attr, dense in sites(model, spec, targets):
        ref = dense.w1
        cfg = spec.moe_config(dense.d_in, dense.width, "swiglu" if dense.gated else "gelu", _check_bias(dense, where),
                              d_out=dense.d_out)
        with torch.device(ref.device):
            moe = UpcycledMoE(cfg, dense.act, dense.gated)
        for p in moe.parameters():  # the model's dtype; buffers (load counts, balancing bias) stay float32
            p.data = p.data.to(ref.dtype)
        if copy and not ref.is_meta:
            fill_moe(moe, dense, generator, spec.noise)
        mlp = UpcycledMLP(moe, dense.dropout)
        setattr(parent, attr, mlp)
        swapped.append(mlp)
    return swapped


def upcycle(model: nn.Module, spec: UpcycleConfig | None = None, **options: Any) -> nn.Module:
    """Upcycle a `transformers` model in place and return it (now an `Upcycled<Class>` instance).

    `options` are `UpcycleConfig` fields (`experts=4, top_k=2, router="competesmoe", layers="all", ...`)."""
    from transformers import PreTrainedModel
    spec = spec if spec is not None else UpcycleConfig.from_dict(options)
    if not isinstance(model, PreTrainedModel):
        raise UpcycleError(f"upcycle() takes a transformers PreTrainedModel, got {type(model).__name__}; "
                           f"use upcycle_transformer() for a competesmoe MoETransformer")
    if isinstance(model, _UpcycledMixin):
        raise UpcycleError(f"{type(model).__name__} is already upcycled")
    base_cls, base_type = type(model), model.config.model_type
    targets = resolve_targets(model, spec)
    spec = dataclasses.replace(spec, targets=",".join(targets))   # saved resolved: "auto" could change meaning
    swap_mlps(model, spec, copy=True, targets=targets)
    cls = upcycled_class(base_cls)
    model.__class__ = cls
    # A shallow copy of the config becomes the upcycled config (the caller's object keeps its class);
    # every module that held the old one gets the new one, sub-configs (a VLM's text_config) stay shared.
    old, config = model.config, copy.copy(model.config)
    config.__class__ = cls.config_class
    for module in model.modules():
        if getattr(module, "config", None) is old:
            module.config = config
    config.competesmoe = {"base_architecture": base_cls.__name__, "base_model_type": base_type,
                          "upcycle": spec.to_dict()}
    config.include_aux_loss = True
    config.architectures = [cls.__name__]
    return model


def is_upcycled(model: nn.Module) -> bool:
    return isinstance(model, _UpcycledMixin)


def _register() -> None:
    """`AutoConfig` learns `competesmoe_upcycled`: it rebuilds `Upcycled<Base>Config` from config.json."""
    from transformers import AutoConfig, PretrainedConfig

    class UpcycledConfig(PretrainedConfig):
        model_type = MODEL_TYPE

        @classmethod
        def from_dict(cls, config_dict: dict, **kwargs: Any):
            import transformers
            info = config_dict.get("competesmoe") or {}
            base = getattr(transformers, info.get("base_architecture", ""), None)
            if base is None:
                raise ValueError(f"config.json of model_type {MODEL_TYPE!r} names no known base architecture "
                                 f"(competesmoe.base_architecture={info.get('base_architecture')!r})")
            return upcycled_class(base).config_class.from_dict(config_dict, **kwargs)

    AutoConfig.register(MODEL_TYPE, UpcycledConfig, exist_ok=True)


_register()


# --- our own MoETransformer trained with model.dense=true ---------------------------------------------
def upcycle_transformer(dense: MoETransformer, spec: UpcycleConfig) -> MoETransformer:
    """A new `MoETransformer` whose experts are copies of `dense`'s FFNs (`model.dense=true`)."""
    if not dense.cfg.dense:
        raise UpcycleError(f"the model is already an MoE ({dense.cfg.moe.n_experts} experts, K {dense.cfg.moe.top_k}); "
                           f"upcycle a dense one (train it with --set model.dense=true)")
    if spec.layer_indices(None) is not None:
        raise UpcycleError("layers: a competesmoe MoETransformer upcycles every layer (use layers=all)")
    if spec.target_list() not in (None, ["language"]):
        raise UpcycleError(f"targets={spec.targets}: a competesmoe MoETransformer is a language model (targets language)")
    ffn = dense.blocks[0].moe  # the dense FFN: a one-expert MoE
    m = ffn.cfg
    moe_cfg = spec.moe_config(m.d_model, m.d_expert, m.activation, m.bias)
    cfg = dataclasses.replace(dense.cfg, dense=False, moe=moe_cfg)
    model = MoETransformer(cfg).to(next(dense.parameters()))
    state = {k: v for k, v in dense.state_dict().items() if ".moe." not in k}
    model.load_state_dict(state, strict=False)
    generator = torch.Generator().manual_seed(spec.seed)
    for src, dst in zip(dense.blocks, model.blocks):
        e = src.moe.experts
        w = DenseMLP(e.w1[0].detach(), None if e.b1 is None else e.b1[0].detach(), e.w2[0].detach(),
                     None if e.b2 is None else e.b2[0].detach(), e.act.fn, gated=e.gated)
        fill_moe(dst.moe, w, generator, spec.noise)
    return model


__all__ = ["UpcycleConfig", "UpcycleError", "UpcycledMLP", "UpcycledMoE", "DenseMLP", "upcycle",
           "upcycle_transformer", "upcycled_class", "is_upcycled", "read_dense_mlp", "decoder_layers", "fill_moe",
           "MODEL_TYPE", "ADAPTERS", "TARGETS", "vision_layers", "vision_tower", "is_vlm", "resolve_targets", "sites",
           "param_groups", "freeze"]
