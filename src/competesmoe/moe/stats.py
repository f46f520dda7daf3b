"""Routing statistics, one home for the layer's logs, the training metrics and the analysis.

- `overlap` / `agreement`: |A ∩ B| / K of two top-K selections; router vs competition is the "Level
  Learning" of Appendix F (Figure 5), the expert change rate of Section 5.2.2 is 1 − overlap.
- `selection_share` / `selection_entropy`: how often each expert is chosen, and the entropy of that
  frequency (Appendix G, Figure 6; max log N).

Results are tensors on the inputs' device (no graph, no host sync), so a training step can log them.
Shapes: T tokens, K choices per token (distinct experts, best first), N routed experts.
"""
from __future__ import annotations

import torch


def overlap(a_TK: torch.Tensor, b_TK: torch.Tensor) -> torch.Tensor:
    """Per token |A ∩ B| / K of two top-K selections (each row holds K distinct experts): [T]."""
    if a_TK.dim() != 2 or a_TK.shape != b_TK.shape:
        raise ValueError(f"expected two [T, K] index tensors of the same shape, "
                         f"got {tuple(a_TK.shape)} and {tuple(b_TK.shape)}")
    return (a_TK[:, :, None] == b_TK[:, None, :]).any(-1).float().mean(-1)


def agreement(router_TK: torch.Tensor, competition_TK: torch.Tensor) -> dict[str, torch.Tensor]:
    """Router–competition agreement: mean |I_R ∩ I_C| / K, and top-1 agreement (the router's first
    choice is the competition's best expert)."""
    return {"agreement": overlap(router_TK, competition_TK).mean(),
            "top1_agreement": (router_TK[:, 0] == competition_TK[:, 0]).float().mean()}


def selection_share(idx_TK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Share of the T·K selections that went to each expert: [N], sums to 1 (zeros for no selection)."""
    counts_N = torch.bincount(idx_TK.reshape(-1).long(), minlength=n_experts)
    if counts_N.numel() > n_experts:
        raise ValueError(f"expert index {int(idx_TK.max())} out of range for n_experts={n_experts}")
    counts_N = counts_N.float()
    return counts_N / counts_N.sum().clamp_min(1)


def selection_entropy(idx_TK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Entropy (nats) of one layer's expert-selection frequency over the tokens; max log N."""
    p_N = selection_share(idx_TK, n_experts)
    return -(p_N * p_N.clamp_min(1e-30).log()).sum()
