"""Training tokens/s of a preset for several routers, measured in one run (rounds alternate routers).

    python benchmarks/train_throughput.py --preset tiny --routers smoe,competesmoe --rounds 3 --steps 40 \
        --out docs/results/train-throughput.md

Also prints the overhead that the competition's FLOPs imply: each competing layer runs all N experts
forward once more (no graph), i.e. 4·D·H·N FLOPs per token (gated experts: 6·D·H·N), against a step's
forward+backward FLOPs (3 × forward: attention, router, K experts per layer, and the output head).
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile

import torch

from common import emit
from competesmoe.train import Trainer, run_preset


def flops_per_token(cfg) -> tuple[float, float]:
    """(forward FLOPs of a normal step, extra forward FLOPs of one competing layer), per token."""
    m, e = cfg.model, cfg.model.moe
    D, H, S, V = m.d_model, e.d_expert, cfg.data.seq_len, m.vocab_size
    per_expert = (6 if e.activation == "swiglu" else 4) * D * H
    inner = m.n_heads * m.head_dim
    layer = 2 * D * 3 * inner + 2 * inner * D + 4 * S * inner / 2 + 2 * D * e.n_routed + per_expert * e.top_k
    return m.n_layers * layer + 2 * D * V, per_expert * e.n_routed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--routers", default="smoe,competesmoe")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--out")
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
                                           f"train.ckpt_every={args.steps}", "train.log_every=10",
                                           "train.tensorboard=false", f"data.cache_dir={cache}",
                                           "data.progress=false", *args.overrides, *(extra.split("+") if extra else [])])
            tr = Trainer(cfg, log=lambda *_: None)
            tr.train()
            rows = [json.loads(l) for l in open(f"{out}/metrics.jsonl") if '"tokens_per_s"' in l]
            speeds[router].append(statistics.median(r["tokens_per_s"] for r in rows[1:]))   # skip warm-up
            fwd, extra_flops = flops_per_token(cfg)
            expected_c = cfg.train.schedule.omega * cfg.model.n_layers if name == "competesmoe" else 0.0
            info[router] = {"implied_overhead": expected_c * extra_flops / (3 * fwd),
                            "expected_competing_layers": expected_c}
            print(router, f"round {rnd}", f"{speeds[router][-1]:.0f} tokens/s", file=sys.stderr)
    base = list(speeds)[0]
    lines = [f"# Training throughput, preset `{args.preset}`", "",
             f"- command: `python benchmarks/train_throughput.py {' '.join(sys.argv[1:])}`",
             f"- date: {datetime.date.today()}, torch {torch.__version__}, {torch.get_num_threads()} threads (CPU)",
             f"- each router trained {args.steps} steps per round, {args.rounds} rounds alternating routers; "
             "tokens/s = median of the 10-step windows after the first", "",
             f"| router | tokens/s (median of rounds) | per round | slowdown vs {base} | FLOP-implied overhead |",
             "|---|---|---|---|---|"]
    med = {r: statistics.median(v) for r, v in speeds.items()}
    for r, v in speeds.items():
        lines.append(f"| {r} | {med[r]:.0f} | {', '.join(f'{x:.0f}' for x in v)} | {med[base] / med[r] - 1:+.1%} "
                     f"| {info[r]['implied_overhead']:+.1%} (E[competing layers] = {info[r]['expected_competing_layers']:.2f}) |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
