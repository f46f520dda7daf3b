"""The competition schedule Λ[l, t] (Sections 2.3.2, 2.4 and Appendix C).

Built once, before training, from its own seeded generator: each layer competes at each step with
probability ω; a step never has more than A_max competing layers. An activation that would exceed it is
deferred to the next free step (Section 2.4: "deferred to perform competition in the next step"):
t+1, t+2, …; only when no later step is free does it go back to the latest free earlier step (Eq. (12)
allows any t' ≠ t), and when no step is free it is dropped. Warm-up steps and steps past the
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
        check(n_layers >= 0, f"n_layers must be >= 0 (0: a dense model, nothing competes), got {n_layers}")
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

    def resize(self, total_steps: int) -> None:
        """A new planned total (a resumed run trained longer): the table is rebuilt for `total_steps` (draws,
        A_max placement and warm-up over the new total, same seed), and the steps already taken keep the
        decisions they were trained with."""
        check(total_steps >= self.step, f"total_steps={total_steps} is before the current step {self.step}")
        new = CompetitionSchedule(self.n_layers, total_steps, **self.cfg.to_dict())
        new.table[:, :self.step] = self.table[:, :self.step]
        self.table, self.total_steps, self.warmup_steps = new.table, total_steps, new.warmup_steps

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
    """Appendix C: Bernoulli(ω) per (layer, step), then the A_max redistribution."""
    rng = np.random.default_rng(seed)
    draws = rng.random((L, T)) < omega
    return place(draws, a_max, warmup_steps)


def place(draws: np.ndarray, a_max: int, warmup_steps: int = 0) -> np.ndarray:
    """Eqs. (11)-(12): layers in order, each draw at its own step if fewer than A_max earlier layers compete
    there, else at the first free step after it (then the last free one before it); dropped when none is free.
    Free: fewer than A_max layers and this layer not already there. Draws inside the warm-up are ignored."""
    L, T = draws.shape
    table = np.zeros((L, T), dtype=bool)
    per_step = np.zeros(T, dtype=np.int64)
    # Skip lists over full steps (union-find with path halving): after[t] leads to the first step >= t
    # with room (T: none), before[t + 1] to the last step <= t with room (-1 + 1 = 0: none).
    after = np.arange(T + 1)
    before = np.arange(T + 1)

    def first_open(t: int) -> int:
        while after[t] != t:
            after[t] = after[after[t]]
            t = after[t]
        return t

    def last_open(t: int) -> int:  # in shifted indices: returns s with step s - 1 open, 0 for none
        while before[t] != t:
            before[t] = before[before[t]]
            t = before[t]
        return t

    for l in range(L):
        for t in np.flatnonzero(draws[l, warmup_steps:]) + warmup_steps:
            cand = first_open(int(t))
            while cand < T and table[l, cand]:
                cand = first_open(cand + 1)
            if cand == T:  # nothing free later: the latest free step before t
                cand = last_open(int(t)) - 1
                while cand >= warmup_steps and table[l, cand]:
                    cand = last_open(cand) - 1
                if cand < warmup_steps:
                    continue  # dropped
            table[l, cand] = True
            per_step[cand] += 1
            if per_step[cand] == a_max:
                after[cand] = cand + 1
                before[cand + 1] = cand
    return table
