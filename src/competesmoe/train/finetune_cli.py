"""`competesmoe finetune INIT --data PATH`: fine-tune an upcycled model with any router (docs/upcycle.md).

INIT is a dense model (upcycled first: --experts/--top-k/--router/--layers) or an upcycled one (its own
settings are kept). `--chat` reads `{"messages": [...]}` jsonl and takes the loss on the replies only;
`--llava` (or `--images DIR`) reads LLaVA-format samples for a VLM (`competesmoe vlm STAGE` sets the
paper's stages, Table 10).
`competesmoe finetune --out RUN --resume` continues RUN as saved (its finetune.yaml): INIT and --data are
then optional, and other flags may change only what a resume may change (train/runs.py RESUME_MAY_CHANGE);
`--steps N` trains longer.
"""
from __future__ import annotations

import argparse

from ..config import apply_overrides, check
from .distributed import is_main_process
from .finetune import FINETUNE_PRESETS, FinetuneConfig, finetune, finetune_preset, init_spec
from .runs import saved_run_config
from .upcycle_cli import add_spec_arguments


def add_arguments(p: argparse.ArgumentParser, vlm: bool = False) -> None:
    """`vlm`: the flags of `competesmoe vlm STAGE` (the stage is the preset; the data is LLaVA-format)."""
    p.add_argument("init", nargs="?", help="dense or upcycled model: Hugging Face folder or hub name, competesmoe export, "
                                          "run or checkpoint (optional with --resume)")
    p.add_argument("--data", help="training data: .txt/.jsonl(.gz) file or folder (chat jsonl with --chat, LLaVA JSON "
                                  "with --llava); required unless --resume")
    p.add_argument("--valid", help="validation data (default: a held-out part of --data)")
    if not vlm:
        p.add_argument("--chat", action="store_true", help="chat jsonl with the tokenizer's chat template; loss on "
                                                           "replies only")
        p.add_argument("--llava", action="store_true", help="LLaVA-format samples with images (a VLM; docs/vlm.md)")
        p.add_argument("--preset", choices=sorted(FINETUNE_PRESETS), help="fine-tuning preset (Appendix I.1; default "
                                                                         "vit, with --resume the run's own finetune.yaml)")
    p.add_argument("--images", help="LLaVA data: the folder the samples' \"image\" paths are relative to")
    p.add_argument("--skip-bad", action="store_true", help="LLaVA data: skip (and count) bad samples instead of stopping")
    p.add_argument("--out", help="run folder (checkpoints, metrics.jsonl, hf/ at the end)")
    p.add_argument("--steps", type=int, help="optimizer steps (with --resume: a new total, to train longer)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out as saved from its newest good checkpoint")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--precision", choices=("fp32", "bf16"))
    add_spec_arguments(p, "any FinetuneConfig value, e.g. train.lr=1e-5, omega=0.03, model.noise=0.01, "
                          "kappa=silu, data.seq_len=512 (repeatable)")


def build_config(args: argparse.Namespace):
    saved = saved_run_config(args.out, "finetune.yaml") if args.resume and not args.preset else None
    if saved is not None:   # the run as saved; flags and --set on top (Trainer refuses what may not change)
        cfg = FinetuneConfig.from_dict(saved)
    else:
        check(args.init is not None and args.data is not None,
              "finetune needs INIT and --data (only `--out RUN --resume` of a run with finetune.yaml reads them from it)")
        cfg = finetune_preset(args.preset or "vit")
        have = init_spec(args.init)
        if have is not None:  # an upcycled model keeps its settings unless a flag asks otherwise
            cfg = apply_overrides(cfg, {f"model.{k}": v for k, v in have.items() if not isinstance(v, dict)})
            cfg = apply_overrides(cfg, {f"model.{k}.{kk}": vv for k, v in have.items() if isinstance(v, dict)
                                        for kk, vv in v.items()})
    llava = getattr(args, "llava", False) or args.images is not None     # (the vlm-* presets set it themselves)
    flags = {"model.init": args.init, "data.train": args.data, "data.valid": args.valid,
             "chat": getattr(args, "chat", False) or None, "llava": llava or None, "images": args.images,
             "skip_bad": args.skip_bad or None, "train.steps": args.steps,
             "epochs": 0.0 if args.steps is not None else None,   # explicit steps, not one epoch
             "train.out_dir": args.out, "train.device": args.device, "train.precision": args.precision,
             "model.experts": args.experts, "model.top_k": args.top_k, "model.router": args.router,
             "model.layers": args.layers, "model.targets": args.targets}
    cfg = apply_overrides(cfg, {k: v for k, v in flags.items() if v is not None})
    return apply_overrides(cfg, args.overrides)


def main(args: argparse.Namespace) -> int:
    summary = finetune(build_config(args), resume=args.resume)
    if is_main_process():   # under torchrun: rank 0 reports
        print(f"final validation perplexity: {summary['val_ppl']:.2f} (loss {summary['val_loss']:.4f}) after "
              f"{summary['step']} steps; run folder: {summary['out_dir']}; Hugging Face model: {summary['hf']}")
    return 0
