"""The top-(K+1) shift (Section 5.2.2): at inference, route every token to the router's ranks 2..K+1.

    with top_k_shift(model):
        out = model(ids)          # every MoE layer drops its top-1 expert and takes rank K+1

The router's own `select` is asked for K+1 experts (best first, so the router's ranking rule is kept:
bias-balanced scores for `sharede_v3`, etc.); the first is dropped and the remaining K weights are
rescaled to the total the router gives its normal top-K (1 for softmax routers, `routed_scale` for
`sharede_v3`), i.e. renormalised over the shifted set.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from ..config import ConfigError
from ..moe import moe_layers

Select = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def shifted_select(router: nn.Module, select: Select, logits_TN: torch.Tensor, shift: int = 1
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks shift+1..shift+K of `select` (a router's own selection rule), weights renormalised."""
    K = router.top_k
    if K + shift > logits_TN.shape[-1]:
        raise ConfigError(f"top-(K+{shift}) shift needs K+{shift}={K + shift} <= N={logits_TN.shape[-1]} experts")
    try:
        router.top_k = K + shift
        idx_TJ, w_TJ = select(logits_TN)
    finally:
        router.top_k = K
    mass_T1 = select(logits_TN)[1].sum(-1, keepdim=True)   # the router's usual total weight
    idx_TK, w_TK = idx_TJ[:, shift:], w_TJ[:, shift:]
    return idx_TK, w_TK / w_TK.sum(-1, keepdim=True).clamp_min(torch.finfo(w_TK.dtype).tiny) * mass_T1


@contextlib.contextmanager
def top_k_shift(model: nn.Module, shift: int = 1) -> Iterator[list[nn.Module]]:
    """Within the block, every MoE layer of `model` routes to ranks shift+1..shift+K.

    Meant for inference (the competition never runs in eval mode, so the router decides every step);
    raises if the model is training. Yields the patched routers; restores them on exit."""
    if shift < 1:
        raise ValueError(f"shift must be >= 1, got {shift}")
    layers = moe_layers(model)
    if not layers:
        raise ValueError("top_k_shift: the model has no MoE layers")
    if model.training:
        raise ValueError("top_k_shift is an inference experiment: call model.eval() first")
    routers = [layer.router for layer in layers]
    for router in routers:
        if "select" in router.__dict__:
            raise RuntimeError("top_k_shift: router already patched (nested shifts are not supported)")
        original = router.select
        router.select = lambda logits_TN, r=router, s=original: shifted_select(r, s, logits_TN, shift)
    try:
        yield routers
    finally:
        for router in routers:
            router.__dict__.pop("select", None)
