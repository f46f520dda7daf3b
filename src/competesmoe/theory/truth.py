"""Ground-truth mixing measures G* used by the simulation (distinct, well-separated atoms)."""
from __future__ import annotations

import torch

from competesmoe.theory.model import Atoms

MAX_TRUE_EXPERTS = 3

# One row per true expert, for a one-dimensional input.
_LINEAR = [(2.0, 0.5), (-1.5, -0.5), (0.5, -1.5)]          # (a, b)
_FFN = [(2.0, 4.0, -1.0), (-1.5, -4.0, 1.0), (1.0, -3.0, -0.5)]  # (w2, w1, b): kinks inside [-1, 1]
_VAR = [0.10, 0.05, 0.08]                                   # ν*
_GATE = [1.0, -1.0, 0.0]                                    # β* (softmax gating only)


def _spread(value: float, dim: int) -> list[float]:
    """A d-dimensional weight vector whose first entry is `value` (others: ±value/2)."""
    return [value] + [0.5 * value * (-1) ** k for k in range(1, dim)]


def default_truth(setting: str, gating: str, n_true: int, dim: int = 1, dtype=torch.float64) -> Atoms:
    """G* with `n_true` equally weighted experts, in canonical form (Atoms.canonical)."""
    if not 1 <= n_true <= MAX_TRUE_EXPERTS:
        raise ValueError(f"n_true must be in [1, {MAX_TRUE_EXPERTS}], got {n_true}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    rows = []
    for j in range(n_true):
        if setting == "linear":
            a, b = _LINEAR[j]
            rows.append(_spread(a, dim) + [b])
        elif setting == "ffn":
            w2, w1, b = _FFN[j]
            rows.append([w2] + _spread(w1, dim) + [b])
        else:
            raise ValueError(f"unknown setting {setting!r}")
    expert = torch.tensor(rows, dtype=dtype)
    var = torch.tensor(_VAR[:n_true], dtype=dtype)
    logw = torch.zeros(n_true, dtype=dtype)
    gate = torch.tensor([_spread(g, dim) for g in _GATE[:n_true]], dtype=dtype) if gating == "softmax" else None
    return Atoms(logw, expert, var, gate).canonical()
