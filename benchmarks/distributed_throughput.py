"""Training tokens/s of one process against P processes (torchrun, DDP or FSDP2, gloo on CPU), in one run.

    python benchmarks/distributed_throughput.py --preset tiny --settings 1x2,1x1,2x1 --rounds 3 --steps 40 \
        --out docs/results/distributed-throughput-tiny.md

A setting `PxT` runs P processes with T threads each (OMP_NUM_THREADS).

Every round trains the preset once per process count with `competesmoe train` (same global batch, same
data, same seed); rounds alternate the settings so a change of machine load hits all of them alike. A run's
tokens/s is the median of its logged values (global tokens of each `log_every` window over wall time),
skipping the first window (start-up, allocator warm-up).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common import emit


def run(procs: int, threads: int, args, out: Path, extra: list[str]) -> float:
    sets = [f"train.steps={args.steps}", "train.log_every=10", f"train.eval_every={args.steps}",
            f"train.ckpt_every={args.steps}", "train.tensorboard=false", f"data.cache_dir={args.cache}", *extra]
    cli = ["-m", "competesmoe", "train", "--preset", args.preset, "--out", str(out)] + [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if procs == 1:
        cmd = [sys.executable, *cli]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), *cli]
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
    return statistics.median(tps[1:] if len(tps) > 1 else tps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--settings", default="1x2,1x1,2x1", help="PxT: P processes of T threads each")
    p.add_argument("--parallel", default="ddp", choices=("ddp", "fsdp"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--cache", default="runs/bench-cache")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--out")
    a = p.parse_args()
    settings = [tuple(int(v) for v in s.split("x")) for s in a.settings.split(",")]
    results: dict[tuple[int, int], list[float]] = {s: [] for s in settings}
    with tempfile.TemporaryDirectory(dir="runs" if Path("runs").is_dir() else None) as tmp:
        for r in range(a.rounds):
            for n, th in settings:
                extra = a.overrides + ([f"train.parallel={a.parallel}"] if n > 1 else [])
                results[(n, th)].append(run(n, th, a, Path(tmp) / f"r{r}-{n}x{th}", extra))
                print(f"round {r}: {n} process(es) x {th} thread(s): {results[(n, th)][-1]:,.0f} tokens/s",
                      file=sys.stderr)
    base = statistics.median(results[settings[0]])
    lines = [f"`{' '.join(sys.argv)}` — {datetime.date.today()}, torch {torch.__version__}, {os.cpu_count()} CPU cores, "
             f"{a.parallel} over gloo for P > 1; medians of {a.rounds} rounds.", "",
             "| processes | threads each | tokens/s (median) | per round | vs first setting |", "|---:|---:|---:|---|---:|"]
    for n, th in settings:
        med = statistics.median(results[(n, th)])
        lines.append(f"| {n} | {th} | {med:,.0f} | {', '.join(f'{v:,.0f}' for v in results[(n, th)])} | "
                     f"{med / base:.2f}× |")
    emit(lines, a.out)


if __name__ == "__main__":
    main()
