"""One (variant, seed) run of `competesmoe compare`: config, resumable training, cached measurements.

A run folder OUT/<variant slug>/seed<S>/ is finished when it holds summary.json (written last after
training). analysis.json (ECR / agreement / shift on the fixed token set) and eval.json (zero-shot)
are computed once and reused.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import apply_overrides
from ..train import RunConfig, Trainer, run_preset
from ..train.checkpoint import checkpoints
from ..train.runs import check_same_config, dump_summary
from .variants import Variant

# Applied before the user's --set (which wins): keep every checkpoint, no TensorBoard.
COMPARE_DEFAULTS = ("train.keep_last=1000000", "train.tensorboard=false", "data.progress=false")


def _mentions(overrides: list[str] | tuple[str, ...], leaf: str) -> bool:
    return any(o.split("=", 1)[0].strip().split(".")[-1] == leaf for o in overrides)


def run_config(preset: str, base: list[str], variant: Variant, seed: int, out_dir: Path) -> RunConfig:
    """The config of one run: preset, compare defaults, `base` (--data/--steps/--set), the variant's
    overrides, then router, seeds (model init, data order, competition schedule) and folder.

    Unless given, checkpoints and validations happen every steps/10 steps (curves need them)."""
    cfg = run_preset(preset, list(COMPARE_DEFAULTS) + list(base))
    cfg = apply_overrides(cfg, list(variant.overrides))
    every = max(1, cfg.train.steps // 10)
    given = list(base) + list(variant.overrides)
    auto = {k: every for k in ("ckpt_every", "eval_every") if not _mentions(given, k)}
    return apply_overrides(cfg, {"model.moe.router": variant.router, "train.seed": seed, "data.seed": seed,
                                 "train.schedule.seed": seed, "train.out_dir": str(out_dir),
                                 **{f"train.{k}": v for k, v in auto.items()}})


@torch.no_grad()
def align_shared_init(model: torch.nn.Module, cfg: RunConfig, seed: int) -> int:
    """Overwrite every parameter that a `smoe` model of the same config would also have (same name and
    shape: embeddings, attention, norms, experts) with that reference model's initialisation under
    `seed`, so all routers start from the same shared parts. Returns how many tensors were copied."""
    from ..model import MoETransformer
    ref_cfg = apply_overrides(cfg.model, {"moe.router": "smoe"})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ref = MoETransformer(ref_cfg).state_dict()
    copied = 0
    for name, p in model.state_dict().items():
        if name in ref and ref[name].shape == p.shape and p.is_floating_point():
            p.copy_(ref[name])
            copied += 1
    return copied


@torch.no_grad()
def inference_tokens_per_s(trainer: Trainer) -> float:
    """Forward-only throughput on the run's validation batches (eval mode, after one warm-up batch)."""
    model, t = trainer.model.eval(), trainer.cfg.train
    batches = list(trainer.data.valid_batches(t.batch_size, t.eval_batches))
    with trainer._autocast():
        model(batches[0][:, :-1].to(trainer.device))
    count, tic = 0, time.perf_counter()
    for batch in batches:
        batch = batch.to(trainer.device)
        with trainer._autocast():
            model(batch[:, :-1])
        count += batch[:, :-1].numel()
    return count / max(time.perf_counter() - tic, 1e-9)


def check_same_settings(cfg: RunConfig, out: Path) -> None:
    """A finished run is only reused for the same settings (the tokenizer may have set vocab_size)."""
    from ..config import flatten
    path = out / "config.yaml"
    if path.is_file():
        keys = [k for k in flatten(cfg.to_dict()) if not k.endswith(".vocab_size")]
        check_same_config(cfg, path.read_text(), f"{out} was trained with other settings; use another --out", keys,
                          saved_as="there")


def train_run(cfg: RunConfig, variant: Variant, seed: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or resume, or skip when finished) one run; returns its summary.json content."""
    out = Path(cfg.train.out_dir)
    done = out / "summary.json"
    if done.is_file():
        check_same_settings(cfg, out)
        log(f"[{variant.label} seed {seed}] finished earlier: {done}")
        return json.loads(done.read_text())
    resume = bool(checkpoints(out / "checkpoints"))
    if not resume and out.exists():  # interrupted before its first checkpoint: start clean
        for name in ("metrics.jsonl", "tensorboard"):
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    log(f"[{variant.label} seed {seed}] {'resuming' if resume else 'training'} in {out}")
    trainer = Trainer(cfg, resume=resume, log=log)
    if not resume:
        align_shared_init(trainer.model, trainer.cfg, seed)
    tic = time.perf_counter()
    summary = trainer.train()
    seconds = time.perf_counter() - tic
    summary.update(label=variant.label, router=variant.router, overrides=list(variant.overrides), seed=seed,
                   train_seconds=seconds, resumed=resume,
                   train_tokens=cfg.train.steps * cfg.tokens_per_step,
                   params=trainer.model.num_parameters(), active_params=trainer.model.num_parameters(active=True),
                   infer_tokens_per_s=inference_tokens_per_s(trainer))
    dump_summary(summary, out)
    return summary


def analyse_run(run_dir: Path, seqs_BS1: torch.Tensor, log: Callable[[str], None] = print) -> dict[str, Any]:
    """ECR between consecutive checkpoints, agreement per checkpoint, shift effect (cached)."""
    from .analyze import analyze_checkpoints, checkpoint_paths
    path = run_dir / "analysis.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("tokens") == int(seqs_BS1[:, 1:].numel()):
            return cached
    report = analyze_checkpoints(checkpoint_paths([run_dir]), seqs_BS1, log=lambda *_: None)
    path.write_text(json.dumps(report) + "\n")
    return report


def eval_run(run_dir: Path, tasks: str, data_dir: str | None, limit: int | None,
             batch_size: int = 16) -> dict[str, Any]:
    """Zero-shot results of the run's last checkpoint (cached per tasks/data/limit)."""
    key = {"tasks": tasks, "data_dir": data_dir, "limit": limit}
    path = run_dir / "eval.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached["results"]
    from ..eval import evaluate
    from ..train.runs import load_trained
    model, cfg, tokenizer = load_trained(run_dir, log=lambda *_: None)
    results = evaluate(model, tokenizer, tasks, data_dir, limit=limit, batch_size=batch_size,
                       max_length=cfg.model.max_seq_len, name=run_dir.name, progress=False)
    path.write_text(json.dumps({"key": key, "results": results}) + "\n")
    return results
