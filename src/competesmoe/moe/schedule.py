"""The competition schedule Λ[l, t] (Sections 2.3.2, 2.4 and Appendix C; SPEC §5).

Built once, before training, from its own seeded generator: each layer competes at each step with
probability ω; a step never has more than A_max competing layers (an activation that would exceed it
moves to the nearest free step t−1, t+1, t−2, t+2, … or is dropped). Warm-up steps and steps past the
planned total never compete. The schedule also counts optimizer steps, so every micro-batch of one
optimizer step sees the same decision.
"""
from __future__ import annotations

import numpy as np
import torch

from ..config import ScheduleConfig, check


class CompetitionSchedule:
    def __init__(self, n_layers: int, total_steps: int, omega: float = 0.07, a_max: int = 3,
                 warmup: float = 0.0, seed: int = 42) -> None:
        check(n_layers >= 1, f"n_layers must be >= 1, got {n_layers}")
        check(total_steps >= 1, f"total_steps must be >= 1, got {total_steps}")
        self.cfg = ScheduleConfig(omega=omega, a_max=a_max, warmup=warmup, seed=seed)
        self.n_layers, self.total_steps = n_layers, total_steps
        self.warmup_steps = round(warmup * total_steps)
        self.table = _build_table(n_layers, total_steps, omega, a_max, self.warmup_steps, seed)
        self.step = 0  # the current optimizer step

    @classmethod
    def from_config(cls, cfg: ScheduleConfig, n_layers: int, total_steps: int) -> CompetitionSchedule:
        return cls(n_layers, total_steps, cfg.omega, cfg.a_max, cfg.warmup, cfg.seed)

    def competes(self, layer: int, step: int | None = None) -> bool:
        """Does `layer` compete at `step` (default: the current optimizer step)?"""
        step = self.step if step is None else step
        check(0 <= layer < self.n_layers, f"layer {layer} out of range [0, {self.n_layers})")
        return 0 <= step < self.total_steps and bool(self.table[layer, step])

    def competing_layers(self, step: int | None = None) -> list[int]:
        return [l for l in range(self.n_layers) if self.competes(l, step)]

    @property
    def past_warmup(self) -> bool:
        return self.step >= self.warmup_steps

    def advance(self) -> None:
        self.step += 1

    # --- checkpointing -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"n_layers": self.n_layers, "total_steps": self.total_steps, "config": self.cfg.to_dict(),
                "table": torch.from_numpy(self.table.copy()), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        table = state["table"].numpy() if isinstance(state["table"], torch.Tensor) else np.asarray(state["table"])
        check(table.shape == (state["n_layers"], state["total_steps"]), "corrupt schedule state: table shape")
        self.cfg = ScheduleConfig.from_dict(state["config"])
        self.n_layers, self.total_steps = state["n_layers"], state["total_steps"]
        self.warmup_steps = round(self.cfg.warmup * self.total_steps)
        self.table = table.astype(bool)
        self.step = int(state["step"])

    def __repr__(self) -> str:
        return (f"CompetitionSchedule(layers={self.n_layers}, steps={self.total_steps}, omega={self.cfg.omega}, "
                f"a_max={self.cfg.a_max}, warmup_steps={self.warmup_steps}, active={int(self.table.sum())})")


def _build_table(L: int, T: int, omega: float, a_max: int, warmup_steps: int, seed: int) -> np.ndarray:
    """Appendix C: Bernoulli(ω) per (layer, step), then the A_max redistribution, layers in order."""
    rng = np.random.default_rng(seed)
    draws = rng.random((L, T)) < omega
    draws[:, :warmup_steps] = False
    table = np.zeros((L, T), dtype=bool)
    per_step = np.zeros(T, dtype=np.int64)
    capacity, placed = a_max * (T - warmup_steps), 0
    for l in range(L):
        for t in np.flatnonzero(draws[l]):
            if placed == capacity:  # every step is full: the rest are dropped
                return table
            for cand in _nearest(int(t), warmup_steps, T):
                if per_step[cand] < a_max and not table[l, cand]:
                    table[l, cand] = True
                    per_step[cand] += 1
                    placed += 1
                    break
    return table


def _nearest(t: int, lo: int, hi: int):
    """t, t−1, t+1, t−2, t+2, … restricted to [lo, hi)."""
    yield t
    for d in range(1, max(t - lo, hi - t) + 1):
        if t - d >= lo:
            yield t - d
        if t + d < hi:
            yield t + d
