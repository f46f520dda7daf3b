"""Load-balancing and stability losses (Section 5.1, Appendix I: Switch balance + z-loss, MoEUT entropy).
Inputs are float32 router logits.

Shapes: T tokens, N routed experts, K choices per token, B sequences of S tokens (T = B·S).
"""
from __future__ import annotations

import torch


def switch_loss(logits_TN: torch.Tensor, idx_TK: torch.Tensor) -> torch.Tensor:
    """N · Σ_i f_i P_i; f_i counts all K choices (Σ f = 1), P_i = mean_t softmax(h_t)_i. 1 at balance."""
    N = logits_TN.shape[-1]
    flat = idx_TK.reshape(-1)
    # counts by scatter-add, not bincount: a static shape, so torch.compile traces it without a graph break
    f_N = logits_TN.new_zeros(N).index_add_(0, flat, torch.ones_like(flat, dtype=logits_TN.dtype)) / flat.numel()
    P_N = logits_TN.softmax(dim=-1).mean(dim=0)
    return N * (f_N * P_N).sum()


def entropy_loss(logits_BSN: torch.Tensor) -> torch.Tensor:
    """MoEUT's balance: −H(mean_s softmax(h_s)) per sequence, averaged over sequences."""
    p_BN = logits_BSN.softmax(dim=-1).mean(dim=1)
    return (p_BN * p_BN.clamp_min(1e-30).log()).sum(-1).mean()


def z_loss(logits_TN: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of logsumexp(h)²."""
    return logits_TN.logsumexp(dim=-1).square().mean()
