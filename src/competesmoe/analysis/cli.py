"""`competesmoe analyze RUN_OR_CHECKPOINTS...`: routing analysis report of a run (Section 5.2.2, Appendices F–G).

Runs of `train` and `finetune`, their checkpoints, upcycled Hugging Face folders and exported folders."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="a run folder (all its checkpoints; train or finetune), a checkpoints/ folder, checkpoint "
                        "folders, or a model folder (upcycled Hugging Face folder, competesmoe export)")
    p.add_argument("--data", help="text file/folder (.txt/.jsonl(.gz)) for the token set "
                                  "(default: the run's validation split)")
    p.add_argument("--tokens", type=int, default=4096, help="size of the fixed token set")
    p.add_argument("--seq-len", type=int, help="sequence length of the token set (default: the run's; a model "
                                               "folder: its context, at most 512)")
    p.add_argument("--out", help="report folder (default: RUN/analysis next to the first checkpoint)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-shift", action="store_true", help="skip the top-(K+1) shift experiment")
    p.add_argument("--eval-tasks", help="zero-shot tasks (comma-separated, or all) for the shift experiment")
    p.add_argument("--eval-data", help="zero-shot data folder (see docs/eval.md)")
    p.add_argument("--eval-limit", type=int, help="first N items of each zero-shot task")
    p.add_argument("--device", default="cpu")
    p.add_argument("--llava", metavar="DATA", help="a vision-language model: analyse it on these LLaVA-format samples "
                                                   "(JSON/JSONL) with their images; PATHS are upcycled VLM folders, "
                                                   "e.g. a VIT run's checkpoints and RUN/hf")
    p.add_argument("--images", help="image folder of --llava")
    p.add_argument("--samples", type=int, default=256, help="first N samples of --llava")


def main(args: argparse.Namespace) -> int:
    from .analyze import analyze_checkpoints, checkpoint_paths, run_token_set
    from .report import write_analysis
    if args.llava:
        from .vlm import analyze_vlm
        report = analyze_vlm(args.paths, args.llava, args.images, args.samples, args.batch_size,
                             shift=not args.no_shift, device=args.device)
        out = Path(args.out) if args.out else Path(args.paths[-1]).parent / "analysis"
        written = write_analysis(report, out)
        print(f"analysis of {len(args.paths)} model(s) written to {written['markdown']}")
        return 0
    paths = checkpoint_paths(args.paths)
    seqs = run_token_set(paths[-1], args.tokens, args.data, seq_len=args.seq_len)
    report = analyze_checkpoints(paths, seqs, args.batch_size, shift=not args.no_shift,
                                 eval_tasks=args.eval_tasks, eval_data=args.eval_data,
                                 eval_limit=args.eval_limit, device=args.device)
    from ..train.checkpoint import step_of
    last = paths[-1]
    out = Path(args.out) if args.out else (last.parent.parent / "analysis" if step_of(last) is not None
                                           else last / "analysis")
    written = write_analysis(report, out)
    print(f"analysis of {len(paths)} checkpoint(s) written to {written['markdown']}")
    return 0
