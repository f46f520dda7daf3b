"""Run a model on a fixed token set and record every MoE layer's routing (and the competition's).

Forward hooks on the MoE modules capture each layer's input x and its `MoEOutput`; in analysis mode
`MoE.competition_winners(x)` gives the competition's winners for any router.
Shapes: B sequences, S positions, T = B·S tokens, K choices, N routed experts.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..moe import moe_layers


@dataclass
class LayerRouting:
    indices: list[torch.Tensor] = field(default_factory=list)       # [T_b, K] per batch
    weights: list[torch.Tensor] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)        # [T_b, N]
    winners: list[torch.Tensor] = field(default_factory=list)       # competition's I_C [T_b, K]

    def cat(self, name: str) -> torch.Tensor:
        return torch.cat(getattr(self, name))


@dataclass
class Routings:
    layers: list[LayerRouting]
    loss: float            # mean next-token cross-entropy over the token set (nats)
    tokens: int            # predicted tokens
    seconds: float         # forward wall-clock (hooks included)

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 50.0))

    def indices(self) -> list[torch.Tensor]:
        return [layer.cat("indices") for layer in self.layers]


def token_batches(tokens: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Cut a 1-D token stream into non-overlapping sequences of seq_len + 1 tokens: [B, seq_len + 1].

    With `max_tokens`, only enough sequences to predict (about) that many tokens are kept."""
    tokens = torch.as_tensor(tokens).long().reshape(-1)
    n_seq = (tokens.numel() - 1) // seq_len
    if max_tokens is not None:
        n_seq = min(n_seq, max(1, math.ceil(max_tokens / seq_len)))
    if n_seq < 1:
        raise ValueError(f"need at least {seq_len + 1} tokens for one sequence, got {tokens.numel()}")
    starts = torch.arange(n_seq) * seq_len
    return tokens[starts[:, None] + torch.arange(seq_len + 1)]


@torch.no_grad()
def collect(model: nn.Module, seqs_BS1: torch.Tensor, batch_size: int = 16, winners: bool = True,
            device: str | torch.device = "cpu") -> Routings:
    """Routing of every MoE layer on `seqs_BS1` (inputs [:, :-1], targets [:, 1:]) in eval mode."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError("the model has no MoE layers")
    records = [LayerRouting() for _ in layers]

    def hook(i):
        def fn(module, args, out):
            rec = records[i]
            rec.indices.append(out.indices.cpu())
            rec.weights.append(out.weights.float().cpu())
            rec.logits.append(out.router_logits.float().cpu())
            if winners:
                rec.winners.append(module.competition_winners(args[0])[0].cpu())
        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        loss, count, seconds = lm_loss(model, seqs_BS1, batch_size, device)
    finally:
        for h in handles:
            h.remove()
    return Routings(records, loss, count, seconds)


@torch.no_grad()
def lm_loss(model: nn.Module, seqs_BS1: torch.Tensor, batch_size: int = 16,
            device: str | torch.device = "cpu") -> tuple[float, int, float]:
    """(mean cross-entropy, predicted tokens, seconds) of `model` on the sequences, in eval mode."""
    was_training = model.training
    model.eval()
    total, count, tic = 0.0, 0, time.perf_counter()
    try:
        for seq in seqs_BS1.split(batch_size):
            seq = seq.to(device)
            total += float(model(seq[:, :-1], seq[:, 1:]).lm_loss) * seq[:, 1:].numel()
            count += seq[:, 1:].numel()
    finally:
        model.train(was_training)
    return total / count, count, time.perf_counter() - tic
