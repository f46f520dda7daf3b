"""Where the time of one MoE layer step goes on CPU: efficiency vs the dense chain and a profiler table.

    python benchmarks/profile_layer.py --out docs/results/moe_layer-cpu-profile.md

Runs the layer (fine shape by default: 64 experts of 128, K 8, d_model 512, 8192 tokens, fp32) and the
dense chain of equal FLOPs, alternating, each in two fresh processes:
  plain    the default allocator settings
  no-mmap  GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2^34: glibc keeps freed
           memory instead of returning every large buffer to the OS (each new [T·K, D] buffer of 128 MiB
           is otherwise page-faulted in again, at every step)
and a torch.profiler table of the layer's step in the plain process.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from common import emit
from moe_layer import DTYPES, SHAPES, DenseChain, make_moe, step_fn

VARIANTS = {"plain": {}, "no-mmap": {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184"}}


def child(shape: str, dtype: str, tokens: int, repeats: int, profile: bool) -> dict:
    spec = SHAPES[shape]
    moe = make_moe(shape, "smoe", "cpu")
    dense = DenseChain(spec["d_model"], spec["d_expert"], spec["top_k"], spec["activation"])
    x = torch.randn(1, tokens, spec["d_model"])
    g = torch.randn_like(x)
    fns = {"ours": step_fn(moe, x, g, DTYPES[dtype], "cpu"), "dense": step_fn(dense, x, g, DTYPES[dtype], "cpu")}
    for f in fns.values():
        f()
        f()
    times = {k: [] for k in fns}
    faults = {k: 0 for k in fns}
    for _ in range(repeats):                      # alternate, so that load changes hit both alike
        for k, f in fns.items():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
            faults[k] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    res = {k: statistics.median(v) for k, v in times.items()}
    res.update({f"{k}_faults_per_step": v / repeats for k, v in faults.items()})
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof
        with prof(activities=[ProfilerActivity.CPU]) as p:
            fns["ours"]()
        res["table"] = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=48)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="fine", choices=list(SHAPES))
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_profile", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args._child:
        print(json.dumps(child(args.shape, args.dtype, args.tokens, args.repeats, args._profile)))
        return
    load0 = os.getloadavg()[0]
    rows, table = [], ""
    for name, env in VARIANTS.items():
        cmd = [sys.executable, __file__, "--_child", "--shape", args.shape, "--dtype", args.dtype, "--tokens",
               str(args.tokens), "--repeats", str(args.repeats), "--threads", str(args.threads)]
        out = subprocess.run(cmd + (["--_profile"] if name == "plain" else []), env={**os.environ, **env},
                             check=True, capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        table = r.pop("table", table)
        rows.append(f"| {name} | {r['ours'] * 1e3:.0f} | {r['dense'] * 1e3:.0f} | {r['dense'] / r['ours']:.2f} "
                    f"| {r['ours_faults_per_step']:,.0f} | {r['dense_faults_per_step']:,.0f} |")
        print(rows[-1], file=sys.stderr)
    lines = [f"# Profile of one MoE layer step on CPU ({args.shape}, {args.dtype})", "",
             f"- command: `python benchmarks/profile_layer.py {' '.join(sys.argv[1:])}`",
             f"- date: {datetime.date.today()}, torch {torch.__version__}, {args.threads} thread(s), "
             f"{args.tokens} tokens, forward + backward, medians of {args.repeats} alternating runs",
             f"- load average (1 min) at start / end: {load0:.2f} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs "
             "(other jobs share this machine; compare the ratios, not the times)", "",
             "| allocator | layer (ms) | dense chain, same FLOPs (ms) | efficiency | page faults / step, layer "
             "| page faults / step, dense |", "|---|---:|---:|---:|---:|---:|", *rows,
             "", "Profiler, one step of the layer (plain allocator):", "", "```", table.rstrip(), "```"]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
