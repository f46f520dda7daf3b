"""`competesmoe train`: pre-train a language model with any router (paper Section 5.1, Appendix I)."""
from __future__ import annotations

import argparse

from ..config import ROUTERS, apply_overrides, flatten, read_yaml
from .config import RUN_PRESETS, RunConfig, run_preset
from .loop import Trainer
from .metrics import plot_validation
from .runs import dump_summary, saved_run_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(RUN_PRESETS), help="model + training preset (default tiny; with --resume: "
                        "the run's own saved config)")
    p.add_argument("--config", help="a YAML RunConfig (model/data/train sections, any subset): applied on top of --preset; "
                        "flags and --set apply on top of it")
    p.add_argument("--router", choices=ROUTERS, help="router policy of every MoE layer")
    p.add_argument("--data", help="training text: .txt/.jsonl(.gz) file or folder, or hf:NAME (default: synthetic)")
    p.add_argument("--valid", help="validation text (default: a held-out part of --data)")
    p.add_argument("--steps", type=int, help="optimizer steps (with --resume: a new total, to train longer; the log says "
                        "what it does to the learning-rate and competition schedules)")
    p.add_argument("--out", help="run folder: checkpoints, metrics.jsonl, tensorboard/, tokenizer.json")
    p.add_argument("--resume", action="store_true", help="continue the run in --out as saved (its config.yaml) from its "
                        "newest good checkpoint; flags may change only logging, evaluation, checkpointing and how it runs")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--precision", choices=("fp32", "bf16"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config value by dotted path or unique name, e.g. "
                        "model.moe.competition.kappa=silu, omega=0.03, train.lr=1e-3 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def build_config(args: argparse.Namespace) -> RunConfig:
    """The preset, then the --config YAML's values, then the flags, then --set (each on top of the last).
    `--resume` without --preset/--config starts from the run's own saved config instead of the preset."""
    saved = saved_run_config(args.out) if args.resume and not (args.preset or args.config) else None
    cfg = RunConfig.from_dict(saved) if saved is not None else run_preset(args.preset or "tiny")
    if args.config:
        cfg = apply_overrides(cfg, flatten(read_yaml(args.config)))
    flags = {"router": args.router, "data.train": args.data, "data.valid": args.valid, "train.steps": args.steps,
             "train.out_dir": args.out, "train.device": args.device, "train.precision": args.precision}
    cfg = apply_overrides(cfg, {k: v for k, v in flags.items() if v is not None})
    return apply_overrides(cfg, args.overrides)


def main(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    trainer = Trainer(cfg, resume=args.resume)
    summary = trainer.train()
    if not trainer.dist.is_main:  # under torchrun, rank 0 writes the summary and the curve
        return 0
    dump_summary(summary, trainer.out)
    plot = plot_validation(trainer.out, cfg.tokens_per_step)
    print(f"final validation perplexity: {summary['val_ppl']:.2f} (loss {summary['val_loss']:.4f}) "
          f"after {summary['step']} steps; run folder: {summary['out_dir']}; curve: {plot}")
    return 0
