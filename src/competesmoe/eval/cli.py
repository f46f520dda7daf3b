"""`competesmoe eval MODEL [MODEL ...]`: zero-shot benchmarks (and validation perplexity) as a Table-2 report.

Each MODEL is a checkpoint folder, a run folder (its newest good checkpoint; `train` or `finetune`), a
folder written by `competesmoe export` or an upcycled Hugging Face folder (`competesmoe upcycle`, a
fine-tuning run's RUN/hf); several models give several rows of one table. Writes `results.json` and
`results.md` into `--out` and prints the summary table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from .evaluator import TASKS

VALID_TASK = "valid_ppl"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", metavar="MODEL",
                        help="checkpoint folder, run folder or exported Hugging Face folder (several: one row each)")
    parser.add_argument("--tasks", default="all",
                        help=f"comma-separated: {', '.join(TASKS)}, all, or {VALID_TASK} (the run's own validation split)")
    parser.add_argument("--data-dir", default=None, help="benchmark folder (default ../shared/data/eval)")
    parser.add_argument("--limit", type=int, default=None,
                        help="first N items per task (pairs per BLiMP paradigm, articles of WikiText-2, batches of valid_ppl)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="eval", help="folder for results.json and results.md")
    parser.add_argument("--names", default=None, help="comma-separated row names (default: the folder names)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--mc-metric", default="acc", choices=("acc", "acc_norm", "acc_bytes"),
                        help="metric of the PIQA / ARC / HellaSwag columns")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def split_tasks(tasks: str) -> tuple[list[str], bool]:
    """(benchmark task names for `evaluate`, whether valid_ppl was asked for)."""
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    return [t for t in names if t != VALID_TASK], VALID_TASK in names


def load_model(path: str | Path, device: str = "cpu") -> tuple[Any, Any, Any, int, int]:
    """(model, tokenizer, RunConfig/FinetuneConfig or None, max_length, eos id) from a checkpoint, run or
    model folder (`eval.loading.load_any`)."""
    from ..model.hf import is_hf_folder, load_hf
    if is_hf_folder(path):
        model, tok = load_hf(path, device)
        return model, tok, None, model.config.max_position_embeddings, tok.eos_token_id
    from .loading import load_any
    loaded = load_any(path, device=device, log=lambda *_: None)
    return loaded.eval_model, loaded.eval_tokenizer, loaded.cfg, loaded.max_length, loaded.eos_id


def valid_perplexity(model: Any, cfg: Any, batch_size: int, max_batches: int | None = None,
                     device: str | torch.device = "cpu", loaded: Any = None) -> dict[str, Any]:
    """Token perplexity on the run's validation split, computed as the trainer computes it (`lm_loss`);
    for a fine-tuning run (`loaded`) on its own validation split (chat data: the reply tokens only)."""
    from ..train import lm_loss
    if loaded is not None and loaded.kind == "finetune":
        from ..data.batches import SequentialBatches
        valid = loaded.valid_tokens()
        if valid is None:
            raise ConfigError(f"{loaded.path}: the fine-tuning run has no validation split")
        batches = SequentialBatches(valid, loaded.seq_len, batch_size, max_batches)
        res = lm_loss(loaded.model, batches, device)
    else:
        from ..data import prepare_data
        data = prepare_data(cfg.data, log=lambda *_: None)
        res = lm_loss(model, data.valid_batches(batch_size, max_batches), device)
    return {"ppl": res.ppl, "nll": res.loss * res.tokens, "tokens": res.tokens, "n": res.tokens}


def evaluate_one(path: str, name: str, args: argparse.Namespace, tasks: list[str], want_valid: bool,
                 device: torch.device) -> dict[str, Any]:
    from . import evaluate
    from ..model.hf import is_hf_folder
    loaded = None
    if is_hf_folder(path):
        model, tok, cfg, max_length, eos = load_model(path, str(device))
    else:
        from .loading import load_any
        loaded = load_any(path, device=str(device), log=lambda *_: None)
        model, tok, cfg, max_length, eos = (loaded.eval_model, loaded.eval_tokenizer, loaded.cfg, loaded.max_length,
                                            loaded.eos_id)
    if tasks:
        result = evaluate(model, tok, tasks, data_dir=args.data_dir, limit=args.limit, batch_size=args.batch_size,
                          name=name, device=device, max_length=max_length, prefix_token_id=eos,
                          progress=not args.no_progress)
    else:
        result = {"name": name, "tasks": {}, "settings": {"limit": args.limit, "batch_size": args.batch_size,
                                                          "max_length": max_length, "device": str(device)}}
    if want_valid:
        if cfg is None:
            print(f"warning: {path}: skipping {VALID_TASK} (an exported folder has no data config; pass the "
                  f"training run instead)", file=sys.stderr)
        else:
            result["tasks"][VALID_TASK] = valid_perplexity(model, cfg, args.batch_size, args.limit, device, loaded)
    result["settings"]["model_path"] = str(path)
    return result


def main(args: argparse.Namespace) -> int:
    from ..train.runs import resolve_device
    from . import results_markdown, write_report
    names = args.names.split(",") if args.names else [Path(p).resolve().name for p in args.models]
    if len(names) != len(args.models):
        raise ConfigError(f"--names has {len(names)} names for {len(args.models)} models")
    tasks, want_valid = split_tasks(args.tasks)
    if tasks:
        from .evaluator import expand_tasks
        expand_tasks(tasks)  # fail on a typo before loading anything
    elif not want_valid:
        raise ConfigError(f"no task given; known: {', '.join(TASKS)}, all, {VALID_TASK}")
    device = resolve_device(args.device)
    runs = [evaluate_one(p, n, args, tasks, want_valid, device) for p, n in zip(args.models, names)]
    ppl_task = VALID_TASK if want_valid else "wikitext2"
    paths = write_report(runs, args.out, mc_metric=args.mc_metric, ppl_task=ppl_task)
    print(results_markdown(runs, args.mc_metric, ppl_task))
    print(f"wrote {paths['markdown']} and {paths['json']}")
    return 0
