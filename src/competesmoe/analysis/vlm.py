"""The routing analyses (ECR, router–competition agreement, entropies, load, top-(K+1) shift) of a
vision–language model on a fixed set of LLaVA-format samples with their images.

    report = analyze_vlm(["runs/vit/checkpoints/step_00000100", "runs/vit/hf"], "test.jsonl", "images/")

Every MoE layer counts — vision encoder layers (their tokens are image patches), the connector, decoder
layers — in module order. The "perplexity" is that of the reply tokens (the samples' labels), the loss the
model computes without the auxiliary loss. The report has the schema of `analysis.analyze`, so
`analysis.report.write_analysis` renders it.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..moe import moe_layers
from . import metrics
from .analyze import _agreement
from .collect import Routings, recording
from .shift import top_k_shift


def vlm_batches(data: str | Path, processor: Any, images: str | Path | None, max_samples: int = 256,
                batch_size: int = 16, aspect: str = "pad") -> list[dict[str, torch.Tensor]]:
    from ..data.llava import collate, load_llava, pad_id
    samples = load_llava(data, processor, images, aspect=aspect).samples[:max_samples]
    return [collate(samples[i:i + batch_size], pad_id(processor)) for i in range(0, len(samples), batch_size)]


@torch.no_grad()
def collect_vlm(model: torch.nn.Module, batches: Sequence[dict], winners: bool = True) -> Routings:
    """Every MoE layer's routing on `batches` (eval mode) and the mean loss over the reply tokens."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        with recording(model, winners) as records:
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                out = model(**batch, include_aux_loss=False)
                n = int((batch["labels"][:, 1:] != -100).sum())
                total += float(out.loss) * n
                count += n
    finally:
        model.train(was_training)
    return Routings(total / max(count, 1), count, 0.0, records)


def _step(path: Path) -> int:
    """A checkpoint's step, a run's final model's (RUN/hf: its summary.json), else -1."""
    m = re.search(r"(?:checkpoint-|step_)(\d+)$", Path(path).name)
    if m:
        return int(m.group(1))
    summary = Path(path).parent / "summary.json"
    if Path(path).name == "hf" and summary.is_file():
        return int(json.loads(summary.read_text())["step"])
    return -1


def load_vlm(path: str | Path, device: Any = "cpu") -> tuple[torch.nn.Module, Any]:
    """(model in eval mode, processor) of an upcycled VLM: a folder (RUN/hf, `competesmoe upcycle` OUT) or a
    `competesmoe vlm`/`finetune` run or checkpoint (its processor: RUN/hf once written, else model.init's)."""
    from transformers import AutoProcessor
    from ..data import DataError
    from ..eval.loading import load_any
    from ..model.upcycle import is_vlm
    loaded = load_any(path, device, log=lambda *_: None)
    if loaded.kind not in ("hf", "finetune") or not is_vlm(loaded.eval_model):
        raise DataError(f"{path}: not a vision-language model (a LLaVA-style upcycled folder, run or checkpoint)")
    source = loaded.path
    if loaded.kind == "finetune":
        run = Path(loaded.path).parent.parent
        source = run / "hf" if (run / "hf" / "config.json").is_file() else loaded.cfg.model.init
    return loaded.eval_model.eval(), AutoProcessor.from_pretrained(str(source))


def analyze_vlm(paths: Sequence[str | Path], data: str | Path, images: str | Path | None, max_samples: int = 256,
                batch_size: int = 16, shift: bool = True, device: str = "cpu",
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """The analysis report of upcycled VLMs (`load_vlm`: e.g. a VIT run's checkpoints and RUN/hf), in step order."""
    paths = sorted((Path(p) for p in paths), key=_step)
    batches, steps, agree, ecr, prev = None, [], [], [], None
    for path in paths:
        model, processor = load_vlm(path, device)
        if batches is None:
            batches = vlm_batches(data, processor, images, max_samples, batch_size)
        r = collect_vlm(model, batches)
        steps.append(_step(path))
        agree.append({"step": steps[-1], "ppl": math.exp(min(r.loss, 50)), **_agreement(r)})
        idx = r.indices()
        if prev is not None:
            ecr.append({"from_step": steps[-2], "to_step": steps[-1], **metrics.expert_change_rate(prev, idx)})
        prev = idx
        log(f"step {steps[-1]}: reply ppl {agree[-1]['ppl']:.3f}, agreement {agree[-1]['agreement']:.3f}"
            + (f", ECR {ecr[-1]['ecr']:.3f}" if ecr else ""))
    cfg = moe_layers(model)[0].cfg
    final = {"step": steps[-1], "ppl": math.exp(min(r.loss, 50)), "loss": r.loss,
             "entropy": [metrics.layer_entropies(l.cat("indices"), l.cat("weights"), l.cat("logits")) for l in r.layers],
             "load": metrics.expert_load(idx, cfg.n_routed).tolist()}
    if shift:
        with top_k_shift(model):
            shifted = collect_vlm(model, batches, winners=False)
        final["shift"] = {"ppl": final["ppl"], "shifted_ppl": math.exp(min(shifted.loss, 50))}
        final["shift"]["delta_ppl"] = final["shift"]["shifted_ppl"] - final["shift"]["ppl"]
    return {"checkpoints": [str(p) for p in paths], "steps": steps, "tokens": r.tokens, "router": cfg.router,
            "n_layers": len(r.layers), "n_experts": cfg.n_routed, "top_k": cfg.k_routed, "ecr": ecr,
            "agreement": agree, "final": final}


__all__ = ["vlm_batches", "collect_vlm", "analyze_vlm", "load_vlm"]
