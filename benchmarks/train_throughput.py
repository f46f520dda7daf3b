"""Training tokens/s of a preset for several routers, measured in one run (rounds alternate routers).

    python benchmarks/train_throughput.py --preset tiny --routers smoe,competesmoe --rounds 3 --steps 40 \
        --out docs/results/train-throughput.md

Also prints the overhead that the competition's FLOPs imply: each competing layer runs all N experts
forward once more (no graph), i.e. 4·D·H·N FLOPs per token (gated experts: 6·D·H·N), and with
`recompute_winners` (default) the K winners once more in backward (4·D·H·K), against a step's
forward+backward FLOPs (3 × forward: attention, router, K experts per layer, and the output head). The
number of competing layers per step is the schedule's own (its table over the steps run), so A_max's cap
counts, not ω·L. On CUDA: peak memory (allocator) of each run, and MFU = tokens/s · 3 · forward FLOPs per
token / --peak-tflops.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile

import torch

from common import emit
from competesmoe.moe.activations import GATED
from competesmoe.train import Trainer, run_preset


def flops_per_token(cfg) -> tuple[float, float]:
    """(forward FLOPs of a normal step, extra forward FLOPs of one competing layer), per token."""
    m, e = cfg.model, cfg.model.moe
    D, H, S, V = m.d_model, e.d_expert, cfg.data.seq_len, m.vocab_size
    per_expert = (6 if e.activation in GATED else 4) * D * H       # gated: W1 holds [gate | up]
    inner = m.n_heads * m.head_dim
    layer = 2 * D * 3 * inner + 2 * inner * D + 4 * S * inner / 2 + 2 * D * e.n_routed + per_expert * e.top_k
    rerun = e.top_k if e.competition.recompute_winners else 0
    return m.n_layers * layer + 2 * D * V, per_expert * (e.n_routed + rerun)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--routers", default="smoe,competesmoe")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log-every", type=int, default=10, help="steps per tokens/s window")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--peak-tflops", type=float, help="the accelerator's peak (dense, training dtype) for MFU")
    p.add_argument("--out", help="Markdown report (raw numbers next to it as .json)")
    args = p.parse_args()
    cache = tempfile.mkdtemp()
    speeds: dict[str, list[float]] = {r: [] for r in args.routers.split(",")}
    info = {}
    for rnd in range(args.rounds):
        for router in speeds:
            out = tempfile.mkdtemp()
            name, _, extra = router.partition(":")
            cfg = run_preset(args.preset, [f"router={name}", f"train.steps={args.steps}", f"train.out_dir={out}",
                                           f"train.eval_every={args.steps}", "train.eval_batches=1",
                                           f"train.ckpt_every={args.steps}", f"train.log_every={args.log_every}",
                                           "train.tensorboard=false", f"data.cache_dir={cache}",
                                           "data.progress=false", *args.overrides, *(extra.split("+") if extra else [])])
            cuda = torch.cuda.is_available()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            tr = Trainer(cfg, log=lambda *_: None)
            tr.train()
            rows = [json.loads(l) for l in open(f"{out}/metrics.jsonl") if '"tokens_per_s"' in l]
            speeds[router].append(statistics.median(r["tokens_per_s"] for r in rows[1:]))   # skip warm-up
            fwd, extra_flops = flops_per_token(cfg)
            # Competing layers per step from the schedule itself (A_max caps each step), over the steps run.
            competing = float(tr.schedule.table[:, :args.steps].sum()) / args.steps if name == "competesmoe" else 0.0
            info[router] = {"implied_overhead": competing * extra_flops / (3 * fwd),
                            "competing_layers_per_step": competing, "omega_times_L": cfg.train.schedule.omega
                            * cfg.model.n_layers if name == "competesmoe" else 0.0, "fwd_flops_per_token": fwd,
                            "peak_GiB": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
            del tr
            print(router, f"round {rnd}", f"{speeds[router][-1]:.0f} tokens/s", file=sys.stderr)
    base = list(speeds)[0]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{torch.get_num_threads()} threads (CPU)"
    lines = [f"# Training throughput, preset `{args.preset}`", "",
             f"- command: `python benchmarks/train_throughput.py {' '.join(sys.argv[1:])}`",
             f"- date: {datetime.date.today()}, torch {torch.__version__}, {device}; load average (1 min) at end "
             f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs",
             f"- each router trained {args.steps} steps per round, {args.rounds} rounds alternating routers; "
             "tokens/s = median of the log windows after the first", "",
             f"| router | tokens/s (median of rounds) | per round | slowdown vs {base} | FLOP-implied overhead "
             "(competing layers / step) | MFU | peak memory (GiB) |", "|---|---|---|---|---|---|---|"]
    med = {r: statistics.median(v) for r, v in speeds.items()}
    for r, v in speeds.items():
        i = info[r]
        i.update(tokens_per_s=med[r], rounds=v, slowdown=med[base] / med[r] - 1)
        i["mfu"] = med[r] * 3 * i["fwd_flops_per_token"] / (args.peak_tflops * 1e12) if args.peak_tflops else None
        mfu = f"{i['mfu']:.1%}" if i["mfu"] is not None else "–"
        mem = f"{i['peak_GiB']:.1f}" if i["peak_GiB"] is not None else "–"
        lines.append(f"| {r} | {med[r]:.0f} | {', '.join(f'{x:.0f}' for x in v)} | {i['slowdown']:+.1%} "
                     f"| {i['implied_overhead']:+.1%} ({i['competing_layers_per_step']:.2f}; ω·L = {i['omega_times_L']:.2f}) "
                     f"| {mfu} | {mem} |")
    emit(lines, args.out)
    if args.out:
        with open(args.out.rsplit(".", 1)[0] + ".json", "w") as f:
            json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
