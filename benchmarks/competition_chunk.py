"""Time of a competition step against the token chunk of the all-expert pass (`competition.chunk_tokens`).

    python benchmarks/competition_chunk.py --out docs/results/competition-chunk-cpu.md
    python benchmarks/competition_chunk.py --device cuda --tokens 16384

For each shape, one MoE layer (router `competesmoe`, ReLU experts) runs a forced competition step,
forward + backward, with the all-expert buffer [N, chunk, D] limited to 2^p elements for several p, and
with the automatic choice (`chunk_tokens=None`). Also reported: a normal (router) step of the same layer.
Medians over --repeats timed runs after warm-up; every number of a table comes from the same process.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys

import torch

from competesmoe import MoE, MoEConfig

from common import emit, sync, timed

SHAPES = {  # name: (d_model, d_expert, n_experts, top_k)
    "tiny preset": (128, 64, 16, 4),
    "paper (fine)": (512, 128, 64, 8),
    "coarse": (512, 1024, 8, 2),
}


def step_time(moe: MoE, x: torch.Tensor, compete: bool, device: str, repeats: int) -> float:
    def step():
        out = moe(x, compete=compete)
        (out.y.square().mean() + out.aux_loss).backward()
    return timed(step, device, repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--powers", default="18,20,22,25", help="chunk budgets 2^p elements")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out")
    args = p.parse_args()
    torch.manual_seed(0)
    powers = [int(s) for s in args.powers.split(",")]
    lines = [f"# Competition step time vs all-expert chunk ({args.device})", "",
             f"- command: `python benchmarks/competition_chunk.py {' '.join(sys.argv[1:])}`",
             f"- date: {datetime.date.today()}, torch {torch.__version__}, {platform.machine()}, "
             f"{torch.get_num_threads()} threads; {args.tokens} tokens, fp32, forward + backward, "
             f"median of {args.repeats}", "",
             "| shape (D, H, N, K) | normal step (ms) | " + " | ".join(f"2^{q} (ms)" for q in powers)
             + " | auto: chunk tokens | auto (ms) |",
             "|---|" + "---:|" * (len(powers) + 3)]
    for name, (D, H, N, K) in SHAPES.items():
        moe = MoE(MoEConfig(d_model=D, d_expert=H, n_experts=N, top_k=K, router="competesmoe",
                            activation="relu")).to(args.device).train()
        x = torch.randn(args.tokens, D, device=args.device, requires_grad=True)
        normal = step_time(moe, x, False, args.device, args.repeats)
        fixed = []
        for q in powers:
            moe.cfg.competition.chunk_tokens = max(1, (1 << q) // (N * max(D, H)))
            fixed.append(step_time(moe, x, True, args.device, args.repeats))
        moe.cfg.competition.chunk_tokens = None
        auto = step_time(moe, x, True, args.device, args.repeats)
        lines.append(f"| {name} ({D}, {H}, {N}, {K}) | {normal * 1e3:.1f} | "
                     + " | ".join(f"{t * 1e3:.1f}" for t in fixed)
                     + f" | {moe._chunk(x)} | {auto * 1e3:.1f} |")
        print(lines[-1], file=sys.stderr)
        sync(args.device)
    emit(lines, args.out)


if __name__ == "__main__":
    main()
