"""Accuracy of a LLaVA-style model on LLaVA-format questions with a closed set of answers.

For each sample every candidate answer is scored by the model's log-likelihood of the reply tokens (the
answer and the end-of-turn token the chat template puts after it), given the image and the question; the
prediction is the best-scoring candidate (ties: the first). Used for the synthetic VQA set
(`data.vqa_synth`, candidates per question kind in `ANSWERS`).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch


@torch.no_grad()
def score_candidates(model: Any, processor: Any, row: dict, candidates: tuple[str, ...], images: Path | None,
                     aspect: str = "pad") -> torch.Tensor:
    """Sum of log p(reply tokens) for each candidate reply to the sample's first human turn: [C]."""
    from ..data.llava import collate, encode_sample, pad_id
    first = row["conversations"][0]
    samples = [encode_sample({**row, "conversations": [first, {"from": "gpt", "value": c}]}, row.get("id", "?"),
                             processor, images, aspect=aspect) for c in candidates]
    batch = collate(samples, pad_id(processor))
    device = next(model.parameters()).device
    labels = batch.pop("labels").to(device)
    out = model(**{k: v.to(device) for k, v in batch.items()})
    logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
    target = labels[:, 1:]
    keep = target != -100
    picked = logp.gather(-1, target.clamp_min(0)[..., None])[..., 0]
    return (picked * keep).sum(-1).cpu()


def vqa_accuracy(model: Any, processor: Any, path: str | Path, images: str | Path | None,
                 answers: dict[str, tuple[str, ...]] | None = None, aspect: str = "pad",
                 limit: int | None = None) -> dict[str, Any]:
    """{"accuracy", "n", "per_kind": {kind: accuracy}} over the samples of a JSONL file with a "kind" field."""
    from ..data.vqa_synth import ANSWERS
    answers = answers or ANSWERS
    was_training = model.training
    model.eval()
    right, seen = Counter(), Counter()
    try:
        lines = [l for l in Path(path).read_text().splitlines() if l.strip()]
        for line in lines[:limit]:
            row = json.loads(line)
            cands = answers[row["kind"]]
            scores = score_candidates(model, processor, row, cands, Path(images) if images else None, aspect)
            pred = cands[int(scores.argmax())]
            seen[row["kind"]] += 1
            right[row["kind"]] += pred == row["conversations"][1]["value"]
    finally:
        model.train(was_training)
    n = sum(seen.values())
    return {"accuracy": sum(right.values()) / max(n, 1), "n": n,
            "per_kind": {k: right[k] / seen[k] for k in sorted(seen)}}


__all__ = ["score_candidates", "vqa_accuracy"]
