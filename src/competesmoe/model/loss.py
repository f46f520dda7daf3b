"""Language-model cross-entropy without float32 copies of the [B·S, V] logits.

`F.cross_entropy(logits.float(), ..)` keeps an upcast copy of the logits and their log-softmax for
backward: 2 × 4 bytes per logit, 25 GiB at 65,536 tokens of a 50k vocabulary. `lm_cross_entropy` takes
the logits in their own dtype (bf16 under autocast) and evaluates the loss a block of rows at a time,
recomputing each block in backward (`moe.rowwise`): the float32 work exists for one block, and backward
writes one gradient in the logits' dtype. Same value and gradient as the float32 reference.
Shapes: N rows (tokens), V vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..moe.rowwise import rowwise


def lm_cross_entropy(logits_NV: torch.Tensor, targets_N: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy over the rows whose target is not `ignore_index` (F.cross_entropy's mean)."""
    if logits_NV.dim() != 2 or targets_N.shape != logits_NV.shape[:1]:
        raise ValueError(f"lm_cross_entropy expects logits [N, V] and targets [N], got {tuple(logits_NV.shape)} "
                         f"and {tuple(targets_N.shape)}")

    def rows(l_bV, t_b):
        return F.cross_entropy(l_bV.float(), t_b, ignore_index=ignore_index, reduction="none")

    loss_N = rowwise(rows, logits_NV, targets_N)   # blocks of `block_elements(device)` logits
    return loss_N.sum() / (targets_N != ignore_index).sum()
