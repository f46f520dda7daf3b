"""Expert recovery with the real `MoE` layer: does the method users train inherit the rates of Section 3?

`competesmoe theory` fits idealised maximum-likelihood estimators. This benchmark trains the library's own
`MoE` layer, with the routers users train, on samples from a teacher `MoE` with known experts, and asks
how fast the students' experts approach the teacher's as the sample size n grows.

Teacher (N* experts, each a one-hidden-unit GELU FFN with biases, g(x) = W2·gelu(W1·x + b1) + b2, like
Section 3's one-unit experts), all N* experts active (K = N*), gated either
  * by competition: weights s_i = a_i / Σ_j a_j, a_i = mean_d softplus(g_i(x))_d — the layer's own
    competition (Section 2.2, Eq. (13)); the gate comes from the experts' outputs as in Eq. (6);
  * by a softmax router (control): s = softmax(β·x) over the N* experts (Eq. (1) with K = N*).
Data: X uniform on [-1, 1]^D, Y = teacher(X) + σ·ε, ε ~ N(0, I_D).

Students (N > N* experts: over-specified, top-K = N* of N), trained full-batch with Adam on the squared
error (plus the layer's own auxiliary losses, no balance loss):
  * `smoe`: the softmax router;
  * `competesmoe:ω`: CompeteSMoE with the scheduled competition of Sections 2.3-2.4 on a fraction ω of the
    steps (one layer, so A_max = 1 does not bind); evaluated, as users deploy it, through its router;
  * `ideal`: the competition on every step, in training and in evaluation (no router: the estimator
    the theory studies, but fitted by gradient descent on the layer).

Measured on a held-out set of fixed inputs:
  * the Voronoi loss (Eq. (9)) between the student's and the teacher's mixing measures: atoms are the
    experts' parameters (W1, b1, W2, b2), weights exp(c_i) are each expert's mean gate weight on the
    held-out inputs (0 for an expert never chosen); the noise variance is known and shared (Δν = 0). Cells
    use the experts' parameters only (the softmax teacher's gate slopes are not compared);
  * the excess negative log-likelihood per output coordinate, E‖ŷ(X) − f*(X)‖² / (2σ²D): the held-out
    Gaussian NLL minus the teacher's, with the known σ (its expectation over the noise);
  * for CompeteSMoE students: the same excess NLL when the layer routes by competition instead of by its
    router, and the router's top-1 agreement with the competition — how well the router itself learned
    (at ω = 1 it trains by distillation alone).
Slopes of log(error) against log(n) with 95 % intervals from resampling whole seeds
(`competesmoe.theory.study.fit_slope`).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import numpy as np
import torch

from competesmoe.config import CompetitionConfig, Config, LossConfig, MoEConfig, check, check_choice
from competesmoe.theory.model import Atoms
from competesmoe.theory.study import fit_slope
from competesmoe.theory.voronoi import voronoi_loss

TEACHERS = ("competition", "softmax")
DEFAULT_STUDENTS = ["smoe", "competesmoe:0.07", "competesmoe:0.3", "competesmoe:1", "ideal"]


@dataclasses.dataclass
class RecoveryConfig(Config):
    teachers: list[str] = dataclasses.field(default_factory=lambda: list(TEACHERS))
    students: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_STUDENTS))
    n_true: int = 2                  # N*, teacher experts (all active)
    n_experts: int = 3               # N, student experts (top-K = N*)
    d_model: int = 2                 # D, input and output dimension
    d_expert: int = 1                # hidden units per expert
    sizes: list[int] = dataclasses.field(default_factory=lambda: [250, 500, 1000, 2000, 4000])
    seeds: int = 3                   # independent data sets (and student inits) per n
    seed: int = 0
    teacher_seed: int = 7            # the teachers' parameters
    noise: float = 0.1               # σ of the output noise
    steps: int = 1000                # full-batch Adam steps per fit
    lr: float = 0.02                 # Adam, cosine to 0.05x
    init: str = "truth"              # "truth": student experts start at perturbed teacher experts; "random"
    init_noise: float = 0.3
    test_size: int = 20000
    bootstrap: int = 1000
    threads: int = 1

    def validate(self) -> None:
        for t in self.teachers:
            check_choice("teacher", t, TEACHERS)
        for s in self.students:
            parse_student(s)
        check(1 <= self.n_true <= self.n_experts, f"need 1 <= n_true <= n_experts, got {self.n_true}, {self.n_experts}")
        check(self.n_experts > self.n_true, "the students must be over-specified: n_experts > n_true")
        check(len(self.sizes) >= 2 and all(n >= 10 for n in self.sizes), f"need >= 2 sample sizes >= 10: {self.sizes}")
        check(self.seeds >= 2, "seeds must be >= 2 for the intervals")
        check(self.noise > 0 and self.steps >= 1 and self.lr > 0, "noise, steps and lr must be positive")
        check_choice("init", self.init, ("truth", "random"))


def parse_student(spec: str) -> tuple[str, float | None]:
    """"smoe", "ideal" or "competesmoe:ω" -> (kind, ω)."""
    if spec in ("smoe", "ideal"):
        return spec, None
    kind, _, omega = spec.partition(":")
    check(kind == "competesmoe" and omega != "", f"student {spec!r}: use smoe, ideal or competesmoe:OMEGA")
    try:
        w = float(omega)
    except ValueError:
        raise check(False, f"student {spec!r}: OMEGA must be a number") from None
    check(0 < w <= 1, f"student {spec!r}: OMEGA must be in (0, 1]")
    return kind, w


# --- layers ---------------------------------------------------------------------------------------------
def layer_config(router: str, n_experts: int, top_k: int, cfg: RecoveryConfig) -> MoEConfig:
    return MoEConfig(d_model=cfg.d_model, d_expert=cfg.d_expert, n_experts=n_experts, top_k=top_k,
                     router=router, activation="gelu", bias=True, backend="loop",
                     competition=CompetitionConfig(recompute_winners=False),   # same values, less overhead
                     losses=LossConfig(balance="none"))


def make_teacher(kind: str, cfg: RecoveryConfig):
    """A teacher `MoE` with N* distinct experts, each carrying at least 20 % of the gate weight on X."""
    from competesmoe.moe import MoE
    router = "competesmoe" if kind == "competition" else "smoe"
    gen = torch.Generator().manual_seed(cfg.teacher_seed)
    x = sample_inputs(4096, cfg.d_model, gen)
    for _ in range(1000):
        moe = MoE(layer_config(router, cfg.n_true, cfg.n_true, cfg))
        with torch.no_grad():
            e = moe.experts
            e.w1.copy_(2.0 * torch.randn(e.w1.shape, generator=gen))
            e.b1.copy_(torch.rand(e.b1.shape, generator=gen) - 0.5)
            e.w2.copy_(torch.randn(e.w2.shape, generator=gen))
            e.b2.copy_(0.5 * torch.randn(e.b2.shape, generator=gen))
            moe.router.gate.weight.copy_(3.0 * torch.randn(moe.router.gate.weight.shape, generator=gen))
        w = mean_gate_weights(moe, x, teacher_forward(moe, kind))
        params = expert_params(moe)
        if float(w.min()) >= 0.2 and float(torch.pdist(params).min()) >= 1.0:
            return moe
    raise RuntimeError("no teacher with balanced, distinct experts found")  # pragma: no cover


def routed_by(moe, competition: bool) -> Callable:
    """The layer as a function of x: gated by its competition (training mode, compete=True) or by its router
    (eval mode)."""
    def fwd(x):
        moe.train(competition)
        return moe(x, compete=True) if competition else moe(x)
    return fwd


def teacher_forward(moe, kind: str) -> Callable:
    """How a teacher routes: its competition (every expert active) or its softmax router."""
    return routed_by(moe, kind == "competition")


def sample_inputs(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    return 2 * torch.rand(n, d, generator=gen) - 1


@torch.no_grad()
def mean_gate_weights(moe, x: torch.Tensor, forward: Callable) -> torch.Tensor:
    """E_X[weight of expert i in the output]: the mixing weights exp(c_i) of the Voronoi loss, [N]."""
    out = forward(x)
    n = moe.cfg.n_routed
    w = torch.zeros(x.shape[0], n).scatter_add_(1, out.indices, out.weights.float())
    return w.mean(0)


def expert_params(moe) -> torch.Tensor:
    """Each expert's parameters as one vector (W1, b1, W2, b2): [N, P]."""
    e = moe.experts
    parts = [e.w1.flatten(1), e.b1, e.w2.flatten(1), e.b2]
    return torch.cat([p.detach().double() for p in parts], dim=1)


def recovery_voronoi(student_params: torch.Tensor, student_w: torch.Tensor, teacher_params: torch.Tensor,
                     teacher_w: torch.Tensor):
    """Eq. (9) between Σ_i w_i δ_{θ_i} (student) and Σ_j w*_j δ_{θ*_j} (teacher); shared known variance."""
    def atoms(params, w):
        w = w.double().clamp_min(0)
        logw = torch.where(w > 0, w.clamp_min(1e-300).log(), torch.full_like(w, -math.inf))
        return Atoms(logw, params.double(), torch.ones(params.shape[0], dtype=torch.float64))
    return voronoi_loss("ffn", atoms(student_params, student_w), atoms(teacher_params, teacher_w))


# --- one fit --------------------------------------------------------------------------------------------
def train_student(spec: str, teacher, x: torch.Tensor, y: torch.Tensor, cfg: RecoveryConfig, seed: int):
    from competesmoe.moe import CompetitionSchedule, MoE, attach_schedule, on_optimizer_step
    kind, omega = parse_student(spec)
    torch.manual_seed(seed)
    moe = MoE(layer_config("smoe" if kind == "smoe" else "competesmoe", cfg.n_experts, cfg.n_true, cfg))
    if cfg.init == "truth":
        with torch.no_grad():
            src = [j % cfg.n_true for j in range(cfg.n_experts)]
            for name in ("w1", "b1", "w2", "b2"):
                t, s = getattr(moe.experts, name), getattr(teacher.experts, name)
                t.copy_(s[src] + cfg.init_noise * torch.randn_like(t))
    schedule = CompetitionSchedule(1, cfg.steps, omega=omega if kind == "competesmoe" else 0.0, a_max=1,
                                   seed=seed)
    attach_schedule(moe, schedule)
    opt = torch.optim.Adam(moe.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t / cfg.steps)))
    x, y = x.detach(), y.detach()
    moe.train()
    for _ in range(cfg.steps):
        out = moe(x, compete=True if kind == "ideal" else None)
        loss = (out.y - y).square().mean() + out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        on_optimizer_step(moe)
    return moe


def student_forward(moe, spec: str) -> Callable:
    """How a trained student is used: through its router (eval), or by competition for `ideal`."""
    return routed_by(moe, parse_student(spec)[0] == "ideal")


@torch.no_grad()
def evaluate(moe, spec: str, teacher, teacher_kind: str, x_test: torch.Tensor, cfg: RecoveryConfig) -> dict:
    f_star = teacher_forward(teacher, teacher_kind)(x_test).y
    scale = 2 * cfg.noise ** 2
    fwd = student_forward(moe, spec)
    out = fwd(x_test)
    rec: dict = {"excess_nll": float((out.y - f_star).square().mean() / scale)}
    v = recovery_voronoi(expert_params(moe), mean_gate_weights(moe, x_test, fwd),
                         expert_params(teacher), mean_gate_weights(teacher, x_test, teacher_forward(teacher, teacher_kind)))
    rec.update(loss=v.loss, exact=v.exact_error, over=v.over_error, weight_term=v.weight_term,
               cell_sizes=v.sizes, over_min_share=v.over_min_share)
    if parse_student(spec)[0] == "competesmoe":
        moe.train()
        comp = moe(x_test, compete=True)
        rec["excess_nll_competition"] = float((comp.y - f_star).square().mean() / scale)
        win, _ = moe.competition_winners(x_test)
        rec["router_top1_agreement"] = float((out.indices[:, 0] == win[:, 0]).float().mean())
        rec["router_agreement"] = float(
            (torch.sort(out.indices, 1).values == torch.sort(win, 1).values).all(1).float().mean())
    moe.eval()
    return rec


# --- the study ------------------------------------------------------------------------------------------
METRICS = {
    "loss": "Voronoi loss (Eq. (9))",
    "exact": "exact-specified experts: Σ w_i‖Δθ‖",
    "over": "over-specified experts: √(Σ w_i‖Δθ‖²)",
    "excess_nll": "excess held-out NLL (as deployed)",
    "excess_nll_competition": "excess held-out NLL, routed by competition",
}


def run_recovery(cfg: RecoveryConfig, log: Callable[[str], None] = print) -> dict:
    cfg.validate()
    torch.set_num_threads(cfg.threads)
    sizes = sorted(cfg.sizes)
    records = []
    for tk in cfg.teachers:
        teacher = make_teacher(tk, cfg)
        tf = teacher_forward(teacher, tk)
        for s in range(cfg.seeds):
            seed = cfg.seed + s
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                x_all = sample_inputs(sizes[-1], cfg.d_model, gen)
                y_all = tf(x_all).y + cfg.noise * torch.randn(x_all.shape, generator=gen)
                x_test = sample_inputs(cfg.test_size, cfg.d_model, gen)
            for n in sizes:                        # one seed's data are nested across n
                for spec in cfg.students:
                    t0 = time.time()
                    moe = train_student(spec, teacher, x_all[:n], y_all[:n], cfg, 1_000_003 * seed + n)
                    rec = {"teacher": tk, "student": spec, "seed": seed, "n": n,
                           **evaluate(moe, spec, teacher, tk, x_test, cfg), "seconds": time.time() - t0}
                    records.append(rec)
            log(f"teacher {tk}, seed {seed}: done ({len(records)} fits)")
    slopes = {}
    for tk in cfg.teachers:
        for spec in cfg.students:
            rs = [r for r in records if r["teacher"] == tk and r["student"] == spec]
            slopes[f"{tk}/{spec}"] = {m: fit_slope(rs, m, cfg.bootstrap, seed=cfg.seed)
                                      for m in METRICS if any(m in r for r in rs)}
    return {"config": cfg.to_dict(), "metrics": METRICS, "records": records, "slopes": slopes}


# --- report ---------------------------------------------------------------------------------------------
def _median(rs: list[dict], key: str) -> float | None:
    v = [r[key] for r in rs if r.get(key) is not None and math.isfinite(r[key])]
    return float(np.median(v)) if v else None


def _slope_text(s: dict | None) -> str:
    if not s or s.get("slope") is None:
        return "—"
    return f"{s['slope']:+.2f} [{s['ci'][0]:+.2f}, {s['ci'][1]:+.2f}]"


def markdown(result: dict) -> str:
    cfg = result["config"]
    rec = result["records"]
    md = [f"N* = {cfg['n_true']} teacher experts, N = {cfg['n_experts']} student experts, top-{cfg['n_true']}, "
          f"D = {cfg['d_model']}, {cfg['d_expert']} hidden unit(s) per expert (GELU, biases), σ = {cfg['noise']}, "
          f"n ∈ {cfg['sizes']}, {cfg['seeds']} seeds, {cfg['steps']} full-batch Adam steps (lr {cfg['lr']}, "
          f"cosine), student experts start at {'perturbed teacher experts (noise ' + str(cfg['init_noise']) + ')' if cfg['init'] == 'truth' else 'random'}; "
          f"held-out set of {cfg['test_size']} inputs.", ""]
    for tk in cfg["teachers"]:
        md += [f"### Teacher gated by {tk}", "",
               "Slopes of log(error) on log(n), 95% interval from resampling seeds (theory for competition-gated "
               "truth: exact −1/2, over-specified −1/4; the idealised estimator's softmax-gating rates, −1/8 or "
               "−1/12, are stated for linear experts only).", "",
               "| student | Voronoi loss | exact | over-specified | excess NLL | excess NLL (competition-routed) |",
               "|---|---|---|---|---|---|"]
        for spec in cfg["students"]:
            s = result["slopes"][f"{tk}/{spec}"]
            md.append(f"| {spec} | " + " | ".join(_slope_text(s.get(m)) for m in
                                                   ("loss", "exact", "over", "excess_nll", "excess_nll_competition")) + " |")
        md += ["", "Medians over seeds at each n (Voronoi loss / excess NLL; CompeteSMoE: router top-1 agreement "
               "with the competition, and the excess NLL when routed by competition):", "",
               "| student | " + " | ".join(f"n={n}" for n in cfg["sizes"]) + " |",
               "|---|" + "---|" * len(cfg["sizes"])]
        for spec in cfg["students"]:
            cells = []
            for n in cfg["sizes"]:
                rs = [r for r in rec if r["teacher"] == tk and r["student"] == spec and r["n"] == n]
                c = f"{_median(rs, 'loss'):.3g} / {_median(rs, 'excess_nll'):.3g}"
                if _median(rs, "router_top1_agreement") is not None:
                    c += f"; agr {_median(rs, 'router_top1_agreement'):.2f}, comp {_median(rs, 'excess_nll_competition'):.3g}"
                cells.append(c)
            md.append(f"| {spec} | " + " | ".join(cells) + " |")
        md.append("")
    return "\n".join(md) + "\n"


def plot(result: dict, path) -> None:
    from competesmoe.plots import pyplot, save
    plt = pyplot()
    cfg = result["config"]
    teachers = cfg["teachers"]
    fig, axes = plt.subplots(2, len(teachers), figsize=(5.5 * len(teachers), 8), squeeze=False)
    for col, tk in enumerate(teachers):
        for row, m in enumerate(("loss", "excess_nll")):
            ax = axes[row][col]
            for k, spec in enumerate(cfg["students"]):
                rs = [r for r in result["records"] if r["teacher"] == tk and r["student"] == spec]
                ns = sorted({r["n"] for r in rs})
                med = [_median([r for r in rs if r["n"] == n], m) for n in ns]
                pts = [(n, v) for n, v in zip(ns, med) if v is not None and v > 0]
                if pts:
                    s = result["slopes"][f"{tk}/{spec}"].get(m, {}).get("slope")
                    ax.plot(*zip(*pts), "o-", color=plt.get_cmap("tab10")(k), ms=4,
                            label=f"{spec}" + (f" ({s:+.2f})" if s is not None else ""))
            ax.set(xscale="log", yscale="log", xlabel="n", ylabel=METRICS[m] + " (median)",
                   title=f"teacher gated by {tk}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    save(fig, path)


def write_outputs(result: dict, out_dir, stem: str = "expert-recovery") -> dict:
    import json
    from pathlib import Path
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    paths["json"].write_text(json.dumps(result, indent=1, default=str))
    paths["md"].write_text(markdown(result))
    plot(result, paths["png"])
    return paths


def add_arguments(p) -> None:
    d = RecoveryConfig()
    p.add_argument("--teachers", default=",".join(d.teachers), help="competition, softmax (comma-separated)")
    p.add_argument("--students", default=",".join(d.students), help="smoe, ideal, competesmoe:OMEGA (comma-separated)")
    p.add_argument("--sizes", default=",".join(map(str, d.sizes)), help="sample sizes n (comma-separated)")
    for name in ("n_true", "n_experts", "d_model", "d_expert", "seeds", "seed", "teacher_seed", "steps",
                 "test_size", "bootstrap", "threads"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("noise", "lr", "init_noise"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--init", choices=("truth", "random"), default=d.init)
    p.add_argument("--out", default="runs/recovery", help="folder for expert-recovery.{md,json,png}")


def main(a) -> int:
    cfg = RecoveryConfig(teachers=a.teachers.split(","), students=a.students.split(","),
                         sizes=[int(v) for v in a.sizes.split(",")], init=a.init,
                         **{k: getattr(a, k) for k in ("n_true", "n_experts", "d_model", "d_expert", "seeds", "seed",
                                                       "teacher_seed", "steps", "test_size", "bootstrap", "threads",
                                                       "noise", "lr", "init_noise")})
    result = run_recovery(cfg, log=lambda m: print(m, flush=True))
    paths = write_outputs(result, a.out)
    print(markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    import argparse
    _p = argparse.ArgumentParser(prog="python -m competesmoe.theory.recovery", description=__doc__.splitlines()[0])
    add_arguments(_p)
    raise SystemExit(main(_p.parse_args()))
