"""`competesmoe upcycle SRC OUT --dry-run`: which modules become MoE layers, and the parameter counts.

Only SRC's config.json is read: the dense model is built on the meta device (shapes, no weights, no
memory) and upcycled there. Counts are unique parameters (a tied LM head counted once):

* total  = every parameter of the upcycled model;
* active = what one token touches: total − Σ_layers (N_routed − K_routed) · (parameters of one routed expert).
  A vision-patch token passes through the vision MoE layers and the connector, a text token through the
  language ones; "active" counts every MoE layer's K experts, as papers report it.

The paper's model (Table 1, Appendix I.1: Phi-3.5-mini + SigLIP-SO400M-patch14-224, a two-layer MLP
connector, vision encoder and connector upcycled to 4 experts, top-2) counts 5.1 B this way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..model.upcycle import MODEL_TYPE, UpcycleConfig, UpcycleError, resolve_targets, sites, upcycle
from ..moe import moe_layers


@dataclass
class UpcyclePlan:
    base: str                       # the dense class
    targets: list[str]
    layers: list[tuple[str, str, int, int]] = field(default_factory=list)   # (where, d_in->H->d_out, per-expert, router)
    dense_total: int = 0
    total: int = 0
    active: int = 0

    def report(self, spec: UpcycleConfig) -> str:
        lines = [f"dry run: {self.base}, targets {','.join(self.targets)}: {len(self.layers)} MoE layers of "
                 f"{spec.experts} experts, top-{spec.top_k}, router {spec.router}"]
        for group in _groups(self.layers):
            lines.append("  " + group)
        lines.append(f"parameters: dense {_fmt(self.dense_total)} ({self.dense_total:,}); upcycled {_fmt(self.total)} total "
                     f"({self.total:,}), {_fmt(self.active)} active per token ({self.active:,})")
        return "\n".join(lines)


def _fmt(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def _groups(layers: list[tuple[str, str, int, int]]) -> list[str]:
    """Consecutive layers of one kind and shape on one line: 'vision layers 0-26 mlp: ...'."""
    out, i = [], 0
    while i < len(layers):
        where, shape, per, router = layers[i]
        kind = where.rsplit(" ", 2)[0] if where.endswith(" mlp") else where
        j = i
        while (j + 1 < len(layers) and layers[j + 1][1:] == (shape, per, router)
               and layers[j + 1][0].rsplit(" ", 2)[0] == kind):
            j += 1
        if j > i:
            first, last = where.split(" ")[-2], layers[j][0].split(" ")[-2]
            name = f"{kind.replace(' layer', ' layers')} {first}-{last} mlp"
        else:
            name = where
        out.append(f"{name}: {shape}, {_fmt(per)} per expert, router {router:,}")
        i = j + 1
    return out


def count(model: torch.nn.Module) -> tuple[int, int]:
    """(total, active per token) unique parameters of a model with competesmoe MoE layers."""
    total = sum(p.numel() for p in model.parameters())
    active = total
    for layer in moe_layers(model):
        per_expert = sum(p[0].numel() for p in layer.experts.parameters())
        active -= per_expert * (layer.cfg.n_routed - layer.cfg.k_routed)
    return total, active


def plan(src: str | Path, spec: UpcycleConfig) -> UpcyclePlan:
    """Build SRC's architecture from its config on the meta device, upcycle it there, and count."""
    from transformers import AutoConfig
    from .loading import auto_class
    try:
        config = AutoConfig.from_pretrained(str(src))
    except (OSError, ValueError) as e:
        raise UpcycleError(f"{src}: cannot read a Hugging Face config.json ({e})") from e
    if getattr(config, "model_type", None) == MODEL_TYPE:
        raise UpcycleError(f"{src} is already upcycled")
    with torch.device("meta"):
        model = auto_class(config).from_config(config)
    result = UpcyclePlan(type(model).__name__, resolve_targets(model, spec))
    result.dense_total = sum(p.numel() for p in model.parameters())
    found = sites(model, spec, result.targets)
    upcycle(model, spec)
    for (where, _, _, dense), layer in zip(found, moe_layers(model)):
        per = sum(p[0].numel() for p in layer.experts.parameters())
        router = sum(p.numel() for p in layer.router.parameters())
        result.layers.append((where, f"{dense.d_in} -> {dense.width} -> {dense.d_out}", per, router))
    result.total, result.active = count(model)
    return result


__all__ = ["UpcyclePlan", "plan", "count"]
