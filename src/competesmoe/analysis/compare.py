"""`competesmoe compare`: train several routers under identical settings and tabulate (paper Table 2).

Every (variant, seed) trains in OUT/<variant>/seed<S>/ from the same preset, data, token budget, data
order and shared-part initialisation; finished runs are skipped and interrupted ones resumed, so the
command can simply be run again. Variant syntax: see `competesmoe.analysis.variants`.

The report gives every arm's validation PPL with its 95 % interval over seeds and tests each arm against
`--baseline` (paired by seed, Welch otherwise; `competesmoe.analysis.stats`), with the smallest
difference the run could detect and the seeds needed for `--detect`.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--routers", default="smoe,xmoe,pcosine,moeut,sharede_v2,sharede_v3,competesmoe",
                   help="comma-separated entries ROUTER[:KEY=VALUE[+KEY=VALUE...]], "
                        "e.g. smoe,competesmoe,competesmoe:kappa=silu+alpha=0")
    p.add_argument("--seeds", default="1,2", help="comma-separated integer seeds")
    p.add_argument("--preset", default="tiny", help="run preset (tiny, small, paper-151m)")
    p.add_argument("--data", help="training text (file, folder or hf:NAME; default: synthetic)")
    p.add_argument("--valid", help="validation text (default: held out from --data)")
    p.add_argument("--steps", type=int, help="optimizer steps of every run")
    p.add_argument("--out", default="runs/compare", help="output folder (one subfolder per run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to every run (repeatable)")
    p.add_argument("--eval-tasks", help="zero-shot tasks for the table (comma-separated, or all)")
    p.add_argument("--eval-data", help="zero-shot data folder (see docs/eval.md)")
    p.add_argument("--eval-limit", type=int, help="first N items of each zero-shot task")
    p.add_argument("--analysis-tokens", type=int, default=2048,
                   help="fixed validation token set for ECR / agreement / shift (0: skip)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: tabulate the finished runs (summary.json) under --out, skip the others")
    p.add_argument("--baseline", help="arm the others are tested against (default: the first of --routers)")
    p.add_argument("--detect", default="0.4%",
                   help="effect to plan for: seeds per arm needed to detect it with 80%% power, as a share "
                        "of the baseline's PPL (0.4%%: the paper's LM gain, 13.66 vs 13.72) or in PPL (0.5)")


def _seeds(text: str) -> list[int]:
    from ..config import ConfigError
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"--seeds needs distinct integers >= 0, got {text!r}")
    return seeds


def base_overrides(args: argparse.Namespace) -> list[str]:
    flags = {"data.train": args.data, "data.valid": args.valid, "train.steps": args.steps}
    return [f"{k}={v}" for k, v in flags.items() if v is not None] + list(args.overrides)


def run_compare(routers: str, seeds: list[int], preset: str, base: list[str], out: str | Path,
                eval_tasks: str | None = None, eval_data: str | None = None, eval_limit: int | None = None,
                analysis_tokens: int = 2048, log: Callable[[str], None] = print,
                baseline: str | None = None, detect: str | None = "0.4%",
                report_only: bool = False) -> dict[str, Path]:
    """Train / resume / reuse every run, then write compare.md, compare.json and the plots."""
    from .compare_report import write_compare
    from .runs import analyse_run, eval_run, run_config, train_run
    from .variants import parse_variants
    from .compare_report import parse_effect
    from ..config import ConfigError
    variants = parse_variants(routers)
    if baseline is not None and baseline not in [v.label for v in variants]:
        raise ConfigError(f"--baseline {baseline!r} is not one of --routers ({', '.join(v.label for v in variants)})")
    parse_effect(detect)                              # a bad --detect fails before anything trains
    out = Path(out)
    # Build every config first: a bad override fails before anything trains.
    plan = [(v, s, run_config(preset, base, v, s, out / v.slug / f"seed{s}")) for v in variants for s in seeds]
    runs: list[dict[str, Any]] = []
    seqs = None
    for variant, seed, cfg in plan:
        if report_only:
            done = Path(cfg.train.out_dir) / "summary.json"
            if not done.is_file():
                log(f"[{variant.label} seed {seed}] not finished: left out of the report")
                continue
        summary = train_run(cfg, variant, seed, log)
        run_dir = Path(cfg.train.out_dir)
        entry: dict[str, Any] = {"label": variant.label, "seed": seed, "dir": str(run_dir), "summary": summary}
        if analysis_tokens > 0:
            if seqs is None:  # the same tokens for every run (identical data settings)
                from .analyze import run_token_set
                seqs = run_token_set(run_dir, analysis_tokens, log=lambda *_: None)
            entry["analysis"] = analyse_run(run_dir, seqs, log)
        if eval_tasks:
            entry["eval"] = eval_run(run_dir, eval_tasks, eval_data, eval_limit)
        runs.append(entry)
    if not runs:
        raise ConfigError(f"no finished run under {out}")
    settings = {"routers": [v.label for v in variants], "seeds": seeds, "preset": preset, "overrides": base,
                "eval_tasks": eval_tasks, "eval_limit": eval_limit, "analysis_tokens": analysis_tokens,
                "baseline": baseline or variants[0].label, "detect": detect}
    return write_compare(runs, settings, out)


def main(args: argparse.Namespace) -> int:
    paths = run_compare(args.routers, _seeds(args.seeds), args.preset, base_overrides(args), args.out,
                        args.eval_tasks, args.eval_data, args.eval_limit, args.analysis_tokens,
                        baseline=args.baseline, detect=args.detect, report_only=args.report_only)
    print(f"comparison written to {paths['markdown']}")
    return 0
