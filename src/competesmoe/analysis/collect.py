"""Run a model on a fixed token set and record every MoE layer's routing (and the competition's).

Forward hooks on the MoE modules capture each layer's input x and its `MoEOutput`; in analysis mode
`MoE.competition_winners(x)` gives the competition's winners for any router.
Shapes: B sequences, S positions, T = B·S tokens, K choices, N routed experts.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..moe import moe_layers
from ..train.validation import LMLoss, lm_loss


@dataclass
class LayerRouting:
    indices: list[torch.Tensor] = field(default_factory=list)       # [T_b, K] per batch
    weights: list[torch.Tensor] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)        # [T_b, N]
    winners: list[torch.Tensor] = field(default_factory=list)       # competition's I_C [T_b, K]

    def cat(self, name: str) -> torch.Tensor:
        return torch.cat(getattr(self, name))


@dataclass
class Routings(LMLoss):    # loss, tokens, seconds (hooks included) and ppl of the token set, plus:
    layers: list[LayerRouting]

    def indices(self) -> list[torch.Tensor]:
        return [layer.cat("indices") for layer in self.layers]


@contextmanager
def recording(model: nn.Module, winners: bool = True):
    """Inside the block, every MoE layer's routing (and with `winners` the competition's) is appended to the
    yielded `LayerRouting`s, one per layer in module order."""
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
        yield records
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def collect(model: nn.Module, seqs_BS1: torch.Tensor, batch_size: int = 16, winners: bool = True,
            device: str | torch.device = "cpu") -> Routings:
    """Routing of every MoE layer on `seqs_BS1` (inputs [:, :-1], targets [:, 1:]) in eval mode."""
    with recording(model, winners) as records:
        res = lm_loss(model, seqs_BS1.split(batch_size), device)
    return Routings(res.loss, res.tokens, res.seconds, records)
