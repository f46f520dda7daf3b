"""Bytes each rank sends per optimizer step under DDP, FSDP2 and expert parallelism, from the parameter shapes.

    python benchmarks/distributed_comm.py --preset paper-151m --gpus 8 --out docs/results/distributed-comm.md

Nothing runs on a GPU: the model is built on the meta device and the formulas below (the ones
`train/distributed.py` and `moe/expert_parallel.py` put into practice) are evaluated on its shapes.
Collectives are counted as NCCL's ring algorithms move data: an all-reduce of B bytes sends
2(P−1)/P·B per rank, an all-gather or reduce-scatter of a B-byte tensor (P−1)/P·B; received = sent.
"""
from __future__ import annotations

import argparse

import torch

from common import emit
from competesmoe.model import MoETransformer
from competesmoe.moe.experts import Experts
from competesmoe.train import run_preset

GB = 1e9


def shapes(cfg) -> dict:
    """Unique parameters: total, expert (routed experts of every layer), and the root FSDP unit's."""
    with torch.device("meta"):
        model = MoETransformer(cfg.model)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for m in model.modules() if isinstance(m, Experts) and m.n_experts > 1
                  for p in m.parameters())
    blocks = sum(p.numel() for b in model.blocks for p in b.parameters())
    return {"total": total, "experts": experts, "root": total - blocks}


def ring(P: int, nbytes: float, kind: str) -> float:
    return (2 if kind == "all_reduce" else 1) * (P - 1) / P * nbytes


def per_step(cfg, P: int, E: int, act_bytes: int = 2, param_bytes: int = 4) -> dict[str, float]:
    """Bytes one rank sends per optimizer step. Weights and gradients are float32 (the trainer keeps fp32
    weights and runs bf16 autocast); token activations cross in the compute dtype (`act_bytes`)."""
    s, t, m = shapes(cfg), cfg.train, cfg.model
    accum, T = t.grad_accum, t.batch_size // P * cfg.data.seq_len          # micro-batch tokens per rank
    K, D, N, L = m.moe.top_k, m.d_model, m.moe.n_routed, m.n_layers
    W = s["total"] * param_bytes
    out = {"ddp: gradient all-reduce": ring(P, W, "all_reduce")}
    # FSDP2 (a unit per block + the root): blocks are all-gathered in forward and again in backward, the
    # root (embedding/head/final norm, not resharded after forward) once, per micro-batch; gradients are
    # reduce-scattered once per step (no sync on the other micro-batches).
    blocks, root = (s["total"] - s["root"]) * param_bytes, s["root"] * param_bytes
    out["fsdp2: parameter all-gathers"] = accum * (2 * ring(P, blocks, "ag") + ring(P, root, "ag"))
    out["fsdp2: gradient reduce-scatter"] = ring(P, W, "rs")
    # expert parallelism: dense weights all-reduced over P; each expert's gradient over its P/E replicas
    if E > 1:
        dense, expert_shard = (s["total"] - s["experts"]) * param_bytes, s["experts"] / E * param_bytes
        out[f"ep{E}: dense gradient all-reduce"] = ring(P, dense, "all_reduce")
        out[f"ep{E}: expert gradient all-reduce"] = ring(P // E, expert_shard, "all_reduce") if P > E else 0.0
        # per MoE layer and micro-batch: dispatch + combine forward, their gradients backward, each moving the
        # (E−1)/E of the T·K (token, choice) pairs that leave the rank under uniform routing
        out[f"ep{E}: token all-to-all"] = accum * L * 4 * (E - 1) / E * T * K * D * act_bytes
        # a competing layer: every rank's tokens to every rank, T·N float32 affinities back
        comp = (E - 1) * T * D * act_bytes + (E - 1) / E * T * N * 4
        mean_layers = min(t.schedule.omega * L, t.schedule.a_max)
        out[f"ep{E}: competition, per competing layer"] = accum * comp
        out[f"ep{E}: competition, mean per step (ω·L = {mean_layers:.2f} layers)"] = accum * comp * mean_layers
        out[f"ep{E}: (if outputs came back instead of affinities)"] = accum * (
            (E - 1) * T * D * act_bytes + (E - 1) / E * T * N * D * act_bytes)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="paper-151m")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--ep", default="8,4,2", help="expert-parallel group sizes to tabulate")
    p.add_argument("--scaling", default="2,4,8,16,32,64", help="process counts for the scaling table")
    p.add_argument("--out")
    a = p.parse_args()
    cfg = run_preset(a.preset)
    s, t, P = shapes(cfg), cfg.train, a.gpus
    T = t.batch_size // P * cfg.data.seq_len
    lines = [f"Preset `{a.preset}`: {s['total']:,} parameters ({s['experts']:,} in routed experts, "
             f"{s['total'] - s['experts']:,} elsewhere); {t.batch_size} × {t.grad_accum} sequences of "
             f"{cfg.data.seq_len} tokens per optimizer step = {cfg.tokens_per_step:,} tokens; on {P} GPUs each "
             f"rank runs micro-batches of {t.batch_size // P} sequences = {T:,} tokens, {t.grad_accum} per step.",
             "", "| what (per rank, per optimizer step) | bytes sent | GB |", "|---|---:|---:|"]
    for E in [1] + [int(e) for e in a.ep.split(",") if int(e) > 1]:
        for k, v in per_step(cfg, P, E).items():
            if E == 1 or k.startswith("ep"):
                lines.append(f"| {k} | {v:,.0f} | {v / GB:.3f} |")
    lines += ["", "Scaling with the number of processes P (GB per rank per step; the global batch stays the "
              "config's, so each rank's tokens shrink as 1/P; EP uses E = P):", "",
              "| P | DDP | FSDP2 | EP=P tokens | EP=P dense grads | EP=P + competition (mean) |",
              "|---:|---:|---:|---:|---:|---:|"]
    for n in (int(x) for x in a.scaling.split(",")):
        if t.batch_size % n:
            continue
        r = per_step(cfg, n, n)
        fsdp = r["fsdp2: parameter all-gathers"] + r["fsdp2: gradient reduce-scatter"]
        tok = r[f"ep{n}: token all-to-all"]
        comp = next(v for k, v in r.items() if "mean per step" in k)
        lines.append(f"| {n} | {r['ddp: gradient all-reduce'] / GB:.3f} | {fsdp / GB:.3f} | {tok / GB:.3f} | "
                     f"{r[f'ep{n}: dense gradient all-reduce'] / GB:.3f} | {(tok + comp) / GB:.3f} |")
    emit(lines, a.out)


if __name__ == "__main__":
    main()
