"""The validation loss of a language model: one loop for the trainer's periodic validation, the
`valid_ppl` of `competesmoe eval` and the fixed token set of `competesmoe analyze`.

    res = lm_loss(model, data.valid_batches(batch_size=8), device="cpu")
    res.loss, res.ppl, res.tokens
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable

import torch
from torch import nn

from ..data import DataError
from ..data.batches import model_inputs


@dataclass
class LMLoss:
    loss: float        # mean next-token cross-entropy over every predicted token (nats)
    tokens: int        # predicted tokens
    seconds: float     # wall-clock of the forwards

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 50.0))


@torch.no_grad()
def lm_loss(model: nn.Module, batches: Iterable, device: str | torch.device | None = None,
            autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> LMLoss:
    """Mean next-token cross-entropy of `model` over `batches` (packed sequences [B, S + 1]: inputs [:, :-1],
    targets [:, 1:]; or batches of samples, `data.batches.model_inputs`), in eval mode (no competition);
    the model's mode is restored afterwards.

    `model(**inputs).lm_loss` is the batch mean over its target tokens, weighted here by their count
    (targets >= 0), so batches count per token. `autocast` makes the context each forward runs in (e.g. bf16)."""
    was_training = model.training
    model.eval()
    total, count, tic = 0.0, 0, time.perf_counter()
    try:
        for batch in batches:
            inputs = model_inputs(batch, device)
            with autocast():
                out = model(**inputs)
            n = (inputs["targets"] >= 0).sum()
            total = total + out.lm_loss.detach().float() * n   # stays on the device: one sync at the end
            count = count + n
    finally:
        model.train(was_training)
    count = int(count)
    if count == 0:
        raise DataError("no complete sequence (or no target token) to evaluate; give more validation data")
    return LMLoss(float(total) / count, count, time.perf_counter() - tic)
