"""Routing metrics of Section 5.2.2 and Appendices F–G as plain functions on index / weight / logit tensors,
returning Python floats for the reports (the tensor versions shared with training live in `moe.stats`).

Shapes: T tokens, K chosen experts per token, N routed experts, L layers. A "routing" of one layer is
an index tensor `[T, K]`; a routing of a model is a list of those, one per MoE layer.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..moe import stats


def expert_change_rate(before: Sequence[torch.Tensor], after: Sequence[torch.Tensor]) -> dict:
    """ECR between two routings of the same tokens: mean over tokens and layers of 1 − |I ∩ I′|/K.

    Returns {"ecr": overall, "per_layer": [L]}; layers weigh equally (same tokens in each)."""
    if len(before) != len(after) or not before:
        raise ValueError(f"ECR needs two routings with the same number (>= 1) of layers, "
                         f"got {len(before)} and {len(after)}")
    per_layer = [float(1.0 - stats.overlap(a, b).mean()) for a, b in zip(before, after)]
    return {"ecr": sum(per_layer) / len(per_layer), "per_layer": per_layer}


def agreement(router_TK: torch.Tensor, competition_TK: torch.Tensor) -> dict:
    """Router–competition agreement of one layer: mean |I_R ∩ I_C| / K, and top-1 agreement
    (the router's first choice equals the competition's best expert). Both index tensors are
    ordered best first."""
    return {k: float(v) for k, v in stats.agreement(router_TK, competition_TK).items()}


def expert_load(indices: Sequence[torch.Tensor], n_experts: int) -> torch.Tensor:
    """Share of the selections that went to each expert, per layer: [L, N], rows sum to 1."""
    rows = [stats.selection_share(idx_TK, n_experts) for idx_TK in indices]
    return torch.stack(rows) if rows else torch.zeros(0, n_experts)


def _entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    p = p.double()
    return -(p * p.clamp_min(1e-300).log()).sum(dim)


def selection_entropy(idx_TK: torch.Tensor, n_experts: int) -> float:
    """Entropy (nats) of one layer's expert-selection frequency over the token set; max log N."""
    return float(stats.selection_entropy(idx_TK, n_experts))


def weight_entropy(w_TK: torch.Tensor) -> float:
    """Mean per-token entropy of the K routing weights renormalised to sum 1; max log K."""
    w_TK = w_TK.double().abs()
    return float(_entropy(w_TK / w_TK.sum(-1, keepdim=True).clamp_min(1e-300)).mean())


def softmax_entropy(logits_TN: torch.Tensor) -> float:
    """Mean per-token entropy of the full router softmax over all N experts; max log N."""
    return float(_entropy(logits_TN.double().softmax(-1)).mean())


def layer_entropies(idx_TK: torch.Tensor, w_TK: torch.Tensor, logits_TN: torch.Tensor) -> dict:
    """The three entropies of one layer, with their maxima for reference."""
    N, K = logits_TN.shape[-1], idx_TK.shape[-1]
    return {"selection": selection_entropy(idx_TK, N), "weights": weight_entropy(w_TK),
            "router_softmax": softmax_entropy(logits_TN), "max_selection": math.log(N), "max_weights": math.log(K)}
