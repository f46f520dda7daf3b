"""`evaluate(model, tokenizer, tasks, data_dir)`: zero-shot benchmarks and perplexity in one call."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable

import torch

from ..config import ConfigError
from . import metrics
from .scoring import Scorer
from .tasks import (MULTIPLE_CHOICE_TASKS, load_blimp, load_lambada, load_multiple_choice, load_wikitext,
                    resolve_data_dir)

TASKS = ("wikitext2", "lambada", "blimp", "piqa", "arc_easy", "arc_challenge", "hellaswag")


def expand_tasks(tasks: str | Iterable[str]) -> list[str]:
    """Task names (a list or a comma-separated string; `all` = every task), checked and deduplicated."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out: list[str] = []
    for name in (n.strip() for n in names):
        if not name:
            continue
        expanded = TASKS if name == "all" else (name,)
        for task in expanded:
            if task not in TASKS:
                raise ConfigError(f"unknown task {task!r}; known: {', '.join(TASKS)}, all")
            if task not in out:
                out.append(task)
    if not out:
        raise ConfigError(f"no task given; known: {', '.join(TASKS)}, all")
    return out


def _load(task: str, data_dir: Path, limit: int | None, wikitext_split: str) -> Any:
    if task == "lambada":
        return load_lambada(data_dir, limit)
    if task == "blimp":
        return load_blimp(data_dir, limit)
    if task == "wikitext2":
        return load_wikitext(data_dir, wikitext_split, limit)
    return load_multiple_choice(task, data_dir, limit)


def _score(task: str, scorer: Scorer, data: Any, stride: int | None, detokenize: bool) -> dict[str, Any]:
    if task == "lambada":
        return metrics.lambada(scorer, data, desc=task)
    if task == "blimp":
        return metrics.blimp(scorer, data, desc=task)
    if task == "wikitext2":
        return metrics.perplexity(scorer, data, stride=stride, detokenize=detokenize, desc=task)
    assert task in MULTIPLE_CHOICE_TASKS
    return metrics.multiple_choice(scorer, data, desc=task)


def evaluate(model: Any, tokenizer: Any, tasks: str | Iterable[str], data_dir: str | Path | None = None,
             limit: int | None = None, batch_size: int = 8, *, name: str = "model",
             device: str | torch.device | None = None, max_length: int | None = None,
             prefix_token_id: int | None = None, wikitext_split: str = "test", stride: int | None = None,
             detokenize: bool = True, progress: bool = True) -> dict[str, Any]:
    """Run `tasks` on `model` and return `{"name", "tasks": {task: metrics}, "settings"}`.

    `limit` keeps the first N items of each task (per paradigm for BLiMP, articles for WikiText-2).
    `max_length` / `prefix_token_id` default to the model's `max_length` / `eos_token_id` (the
    prefix falls back to the tokenizer's `eos_token_id`). `stride` is the perplexity window stride
    (default `max_length`: lm-eval's disjoint windows); `detokenize` applies lm-eval's WikiText
    detokenizer before tokenizing. All data files are read and checked before any scoring.
    """
    if limit is not None and limit < 1:
        raise ConfigError(f"limit={limit} must be >= 1 (or None for every item)")
    names = expand_tasks(tasks)
    root = resolve_data_dir(data_dir)
    data = {task: _load(task, root, limit, wikitext_split) for task in names}
    scorer = Scorer(model, tokenizer, max_length=max_length, prefix_token_id=prefix_token_id,
                    batch_size=batch_size, device=device, progress=progress)
    was_training = getattr(model, "training", None)
    if callable(getattr(model, "eval", None)):
        model.eval()
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    try:
        for task in names:
            start = time.perf_counter()
            results[task] = _score(task, scorer, data[task], stride, detokenize)
            seconds[task] = round(time.perf_counter() - start, 3)
    finally:
        if was_training and callable(getattr(model, "train", None)):
            model.train()
    settings = {"data_dir": str(root), "limit": limit, "batch_size": batch_size,
                "max_length": scorer.max_length, "prefix_token_id": scorer.prefix_token_id,
                "device": str(scorer.device), "wikitext_split": wikitext_split, "stride": stride,
                "detokenize": detokenize, "seconds": seconds}
    return {"name": name, "tasks": results, "settings": settings}
