"""Per-step metrics from the MoE layers' outputs, written as JSONL and TensorBoard events.

`aux_loss` is the model's (summed over MoE layers); each per-layer term (`balance`, `distill`, ...) is
averaged over the layers that report it, so `agreement` is the mean over the layers that competed at that
step (router vs competition, |I_R ∩ I_C| / K). `competing_layers` is the number of layer competitions
summed over the optimizer steps since the previous logged row (a run's total is the column's sum), not a
value of the logged step alone.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..moe.stats import selection_entropy


def micro_metrics(out, detail: bool = True) -> dict[str, torch.Tensor]:
    """Detached scalars of one micro-batch's `LMOutput` (per-layer values averaged over layers); only the
    loss unless `detail` (steps that are not logged need nothing else)."""
    m = {"loss": out.loss.detach(), "competing_layers": torch.tensor(sum(mo.competed for mo in out.moe))}
    if not detail:
        return m
    layers = out.moe
    m.update(lm_loss=out.lm_loss.detach(), aux_loss=out.aux_loss.detach())
    if not layers:   # a dense model
        return m
    for k in sorted({k for mo in layers for k in mo.stats}):
        vals = [mo.stats[k] for mo in layers if k in mo.stats]
        m[k] = torch.stack(vals).mean()
    n_routed = layers[0].router_logits.shape[-1]
    m["routing_entropy"] = torch.stack([selection_entropy(mo.indices, n_routed) for mo in layers]).mean()
    return m


def step_metrics(micro: list[dict[str, torch.Tensor]], grad_norm: torch.Tensor, lr: float) -> dict:
    """Average over micro-batches of `micro_metrics` for one optimizer step."""
    m: dict[str, float | int | None] = {"grad_norm": float(grad_norm), "lr": lr}
    for k in micro[0]:
        vals = [float(mm[k]) for mm in micro if k in mm]
        m[k] = sum(vals) / len(vals)
    m["competing_layers"] = int(micro[0]["competing_layers"])   # the Trainer reports the window's sum instead
    return m


class MetricsLogger:
    def __init__(self, out_dir: Path, tensorboard: bool = True) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional at run time
                self.tb = None

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: v for k, v in metrics.items() if v is not None}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def val_points(run_dir: str | Path, tokens_per_step: float) -> list[tuple[float, float]]:
    """(training tokens, val PPL) of one run; the last row per step wins (resumed runs repeat some)."""
    rows = {r["step"]: r["val_ppl"] for r in read_metrics(run_dir) if "val_ppl" in r}
    return [(step * tokens_per_step, ppl) for step, ppl in sorted(rows.items())]


def plot_validation(run_dir: str | Path, tokens_per_step: float) -> Path:
    """`RUN/val_ppl.png`: validation perplexity against training tokens."""
    from ..plots import lines
    points = val_points(run_dir, tokens_per_step)
    return lines(Path(run_dir) / "val_ppl.png", {Path(run_dir).name: tuple(zip(*points)) or ((), ())},
                 "training tokens", "validation PPL", "Validation perplexity", logy=True)
