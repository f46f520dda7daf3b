"""Voronoi cells (Eq. (8)) and Voronoi losses (Eq. (9) for FFN experts, Eq. (17) for linear ones)."""
from __future__ import annotations

import dataclasses
import math

import torch

from competesmoe.theory.model import Atoms


def atom_vectors(atoms: Atoms) -> torch.Tensor:
    """θ_i for the cells: (W_i, ν_i), preceded by the gate slopes β_i under softmax gating. [N, D]"""
    parts = ([atoms.gate] if atoms.gate is not None else []) + [atoms.expert, atoms.var[:, None]]
    return torch.cat(parts, dim=1)


def voronoi_cells(theta_ND: torch.Tensor, theta_true_MD: torch.Tensor) -> list[list[int]]:
    """Eq. (8): C_j = {i : ‖θ_i − θ*_j‖ ≤ ‖θ_i − θ*_l‖ ∀ l ≠ j}; a tie goes to the lowest j."""
    nearest = torch.cdist(theta_ND, theta_true_MD).argmin(dim=1).tolist()
    return [[i for i, j in enumerate(nearest) if j == jj] for jj in range(theta_true_MD.shape[0])]


def param_blocks(setting: str, n_expert_params: int) -> dict[str, slice]:
    """Named slices of the (W, ν) vector that the loss measures separately.

    ffn, Eq. (9): ‖ΔW‖ + |Δν|;   linear, Eq. (17): ‖Δa‖ + |Δb| + |Δν|.
    """
    p = n_expert_params
    if setting == "ffn":
        return {"W": slice(0, p), "ν": slice(p, p + 1)}
    if setting == "linear":
        return {"a": slice(0, p - 1), "b": slice(p - 1, p), "ν": slice(p, p + 1)}
    raise ValueError(f"unknown setting {setting!r}")


@dataclasses.dataclass
class VoronoiLoss:
    cells: list[list[int]]
    weight_term: float   # Σ_j |Σ_{i∈C_j} exp(c_i) − exp(c*_j)|
    exact_term: float    # Σ_{|C_j|=1} Σ_{i∈C_j} exp(c_i) Σ_blocks ‖Δ‖
    over_term: float     # Σ_{|C_j|>1} Σ_{i∈C_j} exp(c_i) Σ_blocks ‖Δ‖²
    over_blocks: dict[str, float]  # the same, one parameter block at a time (gate slopes "β" too)
    over_min_share: float = math.nan  # smallest atom weight / its cell's weight, over cells of 2+ atoms

    @property
    def loss(self) -> float:
        return self.weight_term + self.exact_term + self.over_term

    @property
    def sizes(self) -> list[int]:
        return [len(c) for c in self.cells]

    @property
    def exact_error(self) -> float:
        """Exact-specified experts' error; Theorem 3.2 / K.1: ~ n^(-1/2). NaN without such cells."""
        return self.exact_term if any(s == 1 for s in self.sizes) else math.nan

    @property
    def over_error(self) -> float:
        """√(over-specified term): the over-specified experts' distance; ~ n^(-1/4) with competition."""
        return math.sqrt(self.over_term) if any(s > 1 for s in self.sizes) else math.nan

    def over_block_error(self, name: str) -> float:
        """√(Σ_{|C_j|>1} Σ_{i∈C_j} exp(c_i) ‖Δ_block‖²): one block's over-specified distance."""
        return math.sqrt(self.over_blocks[name]) if any(s > 1 for s in self.sizes) else math.nan


def voronoi_loss(setting: str, fit: Atoms, truth: Atoms) -> VoronoiLoss:
    """Eq. (9) (ffn) or Eq. (17) (linear) between a fitted and the true mixing measure.

    Both are put in canonical form first (Σ exp(c) = 1). Cells use the whole atom (gate slopes
    included under softmax gating); the loss terms measure the experts' parameters (W, ν).
    An empty cell adds exp(c*_j) to the weight term.
    """
    fit, truth = fit.canonical(), truth.canonical()
    cells = voronoi_cells(atom_vectors(fit), atom_vectors(truth))
    wv = torch.cat([fit.expert, fit.var[:, None]], dim=1)
    wv_true = torch.cat([truth.expert, truth.var[:, None]], dim=1)
    blocks = param_blocks(setting, fit.expert.shape[1])
    w, w_true = fit.logw.exp(), truth.logw.exp()
    weight_term = exact_term = over_term = 0.0
    over_blocks = dict.fromkeys(list(blocks) + (["β"] if fit.gate is not None else []), 0.0)
    shares = [float(w[cell].min() / w[cell].sum()) for cell in cells if len(cell) > 1]
    for j, cell in enumerate(cells):
        weight_term += abs(float(w[cell].sum()) - float(w_true[j]))
        for i in cell:
            dist = {k: float(torch.linalg.vector_norm(wv[i, b] - wv_true[j, b])) for k, b in blocks.items()}
            if len(cell) == 1:   # Eq. (9)/(17): first powers for |C_j| = 1 ...
                exact_term += float(w[i]) * sum(dist.values())
                continue
            over_term += float(w[i]) * sum(d ** 2 for d in dist.values())   # ... squares for |C_j| > 1
            for k, d in dist.items():
                over_blocks[k] += float(w[i]) * d ** 2
            if fit.gate is not None:
                over_blocks["β"] += float(w[i]) * float(torch.linalg.vector_norm(fit.gate[i] - truth.gate[j])) ** 2
    return VoronoiLoss(cells, weight_term, exact_term, over_term, over_blocks, min(shares, default=math.nan))
