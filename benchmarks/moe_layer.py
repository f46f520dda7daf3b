"""Speed and memory of one MoE layer, forward + backward.

    python benchmarks/moe_layer.py                       # both shapes, fp32 and bf16, CPU
    python benchmarks/moe_layer.py --device cuda --repeats 20
    python benchmarks/moe_layer.py --out docs/results/moe_layer-cpu.md

Shapes (8192 tokens, d_model 512):
  fine    64 experts of width 128, K 8 (the paper's LM setting; ReLU experts, SwiGLU for the HF comparison)
  coarse   8 SwiGLU experts of width 1024, K 2
Reported, each a median over --repeats timed runs after warm-up, ratios from the same run:
  1. efficiency = time of a dense matmul chain with the same active FLOPs / time of our layer
  2. speed-up over transformers' MixtralSparseMoeBlock with the same weights (each experts implementation)
  3. competition step / normal step, against the FLOP bound (N + 3K) / (3K) (all N experts forward, the K
     winners forward + backward) and (N + 4K) / (3K) (the winners once more in backward: recompute_winners)
  4. peak memory of a competition step / a normal step: live tensor bytes by the allocator's count (CUDA:
     max_memory_allocated; CPU: the profiler's memory events), and on CPU also the resident high-water mark
     (VmHWM) of a fresh process; each checked on a known allocation, medians of 3 processes
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F
from common import timed

from competesmoe import MoE, MoEConfig
from competesmoe.config import LossConfig

SHAPES = {
    "fine": dict(d_model=512, d_expert=128, n_experts=64, top_k=8, activation="relu"),
    "coarse": dict(d_model=512, d_expert=1024, n_experts=8, top_k=2, activation="swiglu"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_moe(shape: str, router: str, device: str, activation: str | None = None, backend: str = "auto") -> MoE:
    kw = dict(SHAPES[shape])
    if activation:
        kw["activation"] = activation
    return MoE(MoEConfig(**kw, router=router, backend=backend, losses=LossConfig(balance="none"))).to(device).train()


def step_fn(module, x, g, dtype, device, compete=None):
    """One forward + backward under autocast (bf16) or in fp32."""
    def run():
        xi = x.detach().requires_grad_()
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            out = module(xi) if compete is None else module(xi, compete=compete)
            y, aux = (out.y, out.aux_loss) if hasattr(out, "y") else (out, 0.0)
            loss = (y.float() * g).sum() + aux
        loss.backward()
        module.zero_grad(set_to_none=True)
    return run


class DenseChain(torch.nn.Module):
    """x @ W1 -> act -> @ W2 with the layer's active width K·H: the same FLOPs as K experts per token."""

    def __init__(self, d_model, d_expert, top_k, activation):
        super().__init__()
        gated = activation == "swiglu"
        self.activation = activation
        self.w1 = torch.nn.Linear(d_model, top_k * d_expert * (2 if gated else 1), bias=False)
        self.w2 = torch.nn.Linear(top_k * d_expert, d_model, bias=False)

    def forward(self, x):
        h = self.w1(x)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = getattr(F, self.activation)(h)
        return self.w2(h)


def hf_block(moe: MoE, implementation: str):
    """transformers' Mixtral block holding the same weights as `moe` (smoe router, SwiGLU experts)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    c = moe.cfg
    cfg = MixtralConfig(hidden_size=c.d_model, intermediate_size=c.d_expert, num_local_experts=c.n_experts,
                        num_experts_per_tok=c.top_k, router_jitter_noise=0.0, hidden_act="silu",
                        experts_implementation=implementation)
    block = MixtralSparseMoeBlock(cfg).to(moe.experts.w1.device)
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.gate.weight)
        block.experts.gate_up_proj.copy_(moe.experts.w1)
        block.experts.down_proj.copy_(moe.experts.w2)
    return block.train()


def hf_default_implementation() -> str:
    from transformers import MixtralConfig
    cfg = MixtralConfig(hidden_size=64, intermediate_size=64, num_local_experts=4, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=4, vocab_size=32)
    from transformers import MixtralForCausalLM
    return str(MixtralForCausalLM(cfg).config._experts_implementation)


def bench_shape(shape, dtype_name, device, tokens, repeats, hf_impls, backends=("auto",)):
    dtype = DTYPES[dtype_name]
    spec = SHAPES[shape]
    x = torch.randn(1, tokens, spec["d_model"], device=device)
    g = torch.randn_like(x)
    res = {"shape": shape, "dtype": dtype_name, "tokens": tokens}

    moe = make_moe(shape, "smoe", device)
    dense = DenseChain(spec["d_model"], spec["d_expert"], spec["top_k"], spec["activation"]).to(device)
    res["ours_s"] = timed(step_fn(moe, x, g, dtype, device), device, repeats)
    res["dense_s"] = timed(step_fn(dense, x, g, dtype, device), device, repeats)
    res["efficiency"] = res["dense_s"] / res["ours_s"]
    for b in backends:                         # the same layer with each expert dispatch ("auto" is ours_s)
        if b != "auto":
            other = make_moe(shape, "smoe", device, backend=b)
            other.load_state_dict(moe.state_dict())
            res[f"ours_{b}_s"] = timed(step_fn(other, x, g, dtype, device), device, repeats)

    comp = make_moe(shape, "competesmoe", device)
    res["normal_s"] = timed(step_fn(comp, x, g, dtype, device, compete=False), device, repeats)
    res["compete_s"] = timed(step_fn(comp, x, g, dtype, device, compete=True), device, repeats)
    N, K = spec["n_experts"], spec["top_k"]
    res["compete_ratio"] = res["compete_s"] / res["normal_s"]
    res["compete_bound"] = (N + 3 * K) / (3 * K)
    res["compete_bound_recompute"] = (N + 4 * K) / (3 * K)

    swiglu = make_moe(shape, "smoe", device, activation="swiglu")
    res["ours_swiglu_s"] = timed(step_fn(swiglu, x, g, dtype, device), device, repeats)
    for impl in hf_impls:
        block = hf_block(swiglu, impl)
        with torch.no_grad():  # same weights, same outputs (checked once, in fp32)
            diff = (block(x) - swiglu(x).y).abs().max().item()
        res[f"hf_{impl}_maxdiff"] = diff
        res[f"hf_{impl}_s"] = timed(step_fn(block, x, g, dtype, device), device, repeats)
        res[f"speedup_vs_hf_{impl}"] = res[f"hf_{impl}_s"] / res["ours_swiglu_s"]
    return res


# --- peak memory -------------------------------------------------------------------------------------
# Two measures of one step's peak, above what was allocated before it:
#   tensors   the peak of live tensor bytes by the allocator's own count (CUDA: max_memory_allocated; CPU: the
#             "Total Allocated" of the profiler's memory events), what the goal of the issue is about;
#   resident  CPU only: the process' resident high-water mark (VmHWM), which also holds what glibc keeps
#             from freed tensors (it varies with allocation sizes: fine bf16 competition 830-870 MiB
#             resident for 142 MiB of tensors), in a fresh process per probe.
# Not getrusage's ru_maxrss: on Linux it survives exec, so a probe started from a large parent reports
# the parent's peak (how docs/results/moe_layer-cpu.md of 2026-11-27 came to show 1.00 with the same MiB
# for both steps: every child printed the benchmark process's own peak, which grew from row to row).
def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}: the CPU memory probe needs Linux")


def cpu_peak_mib(fn) -> float:
    """Peak resident memory above the current level while `fn` runs, in MiB (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _status_mib("VmRSS")
    fn()
    return _status_mib("VmHWM") - base


def cpu_tensor_peak_mib(fn) -> float:
    """Peak of live CPU tensor bytes above the level before `fn`, from the profiler's allocator events."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        prof.export_chrome_trace(f"{d}/trace.json")
        with open(f"{d}/trace.json") as f:
            events = [e["args"] for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    events = [a for a in events if a.get("Device Type") == 0]
    if not events:
        raise RuntimeError("memory probe broken: the profiler recorded no CPU allocation")
    before = events[0]["Total Allocated"] - events[0]["Bytes"]   # the level just before the first event
    return (max(a["Total Allocated"] for a in events) - before) / 2**20


CALIBRATION_MIB = 64


def memory_probe(shape, dtype_name, device, tokens, compete: bool) -> dict:
    """Peak extra memory of one competesmoe fwd+bwd step (normal or competition), in MiB."""
    dtype = DTYPES[dtype_name]
    moe = make_moe(shape, "competesmoe", device)
    x = torch.randn(1, tokens, SHAPES[shape]["d_model"], device=device)
    g = torch.randn_like(x)
    run = step_fn(moe, x, g, dtype, device, compete=compete)
    if device == "cuda":
        run()  # warm-up allocations (cuBLAS workspaces)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return {"peak_MiB": (torch.cuda.max_memory_allocated() - base) / 2**20}
    # Each probe must see an allocation of known size, else its numbers mean nothing.
    def calibration():
        torch.ones(CALIBRATION_MIB << 18).sum()
    for name, probe in (("resident", cpu_peak_mib), ("tensors", cpu_tensor_peak_mib)):
        calib = probe(calibration)
        if not CALIBRATION_MIB * 0.9 <= calib <= CALIBRATION_MIB * 1.5:
            raise RuntimeError(f"{name} memory probe broken: a {CALIBRATION_MIB} MiB tensor showed as {calib:.1f} MiB")
    resident = cpu_peak_mib(run)          # first: the step's first run in this process
    return {"peak_MiB": cpu_tensor_peak_mib(run), "resident_MiB": resident}


def memory_ratio(shape, dtype_name, device, tokens, probes: int = 3) -> dict:
    if device == "cuda":
        normal = memory_probe(shape, dtype_name, device, tokens, False)
        compete = memory_probe(shape, dtype_name, device, tokens, True)
        runs = {"normal": [normal], "compete": [compete]}
    else:  # a fresh process each, so that the allocator's state belongs to that step alone
        def child(c):
            out = subprocess.run([sys.executable, __file__, "--_memprobe", shape, dtype_name, str(tokens), str(int(c)),
                                  "--threads", str(torch.get_num_threads())],
                                 check=True, capture_output=True, text=True)
            return json.loads(out.stdout.strip().splitlines()[-1])
        # Median of several probes: with 2+ threads, glibc's per-thread arenas now and then keep a few
        # hundred MiB more resident in one process than in the next.
        runs = {"normal": [], "compete": []}
        for _ in range(probes):
            runs["normal"].append(child(False))
            runs["compete"].append(child(True))
    res = {}
    for key, label in (("peak_MiB", ""), ("resident_MiB", "resident_")):
        if key not in runs["normal"][0]:
            continue
        normal = statistics.median(r[key] for r in runs["normal"])
        compete = statistics.median(r[key] for r in runs["compete"])
        if key == "resident_MiB":   # the tensor count may tie: at tiny sizes the weights' gradients are the peak
            check_distinct_probes(normal, compete, f"{shape} {dtype_name} resident")
        elif min(normal, compete) <= 0:
            raise RuntimeError(f"{shape} {dtype_name}: non-positive tensor peaks ({normal}, {compete} MiB)")
        res.update({f"{label}normal_MiB": normal, f"{label}compete_MiB": compete, f"{label}memory_ratio": compete / normal,
                    f"{label}normal_MiB_runs": [r[key] for r in runs["normal"]],
                    f"{label}compete_MiB_runs": [r[key] for r in runs["compete"]]})
    return res


def check_distinct_probes(normal: float, compete: float, what: str) -> None:
    """Two different steps with the same peak to 0.1 MiB: the probe is not measuring the step."""
    if normal <= 0 or compete <= 0 or abs(compete - normal) < 0.1:
        raise RuntimeError(f"{what}: memory probes gave {normal:.2f} MiB (normal) and {compete:.2f} MiB "
                           "(competition); identical or non-positive peaks mean the probe did not see the step")


# --- report ------------------------------------------------------------------------------------------
def report(results, args, hf_default) -> str:
    lines = [f"# MoE layer benchmark ({args.device})", "",
             f"- command: `python benchmarks/moe_layer.py {' '.join(sys.argv[1:])}`",
             f"- date: {datetime.date.today()}, machine: {platform.machine()}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}" + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""),
             f"- tokens {args.tokens}, medians of {args.repeats} timed fwd+bwd runs; transformers' default experts "
             f"implementation: `{hf_default}`",
             f"- load average (1 min) at start / end: {args.load_start:.2f} / {os.getloadavg()[0]:.2f} "
             f"on {os.cpu_count()} CPUs (other jobs share this machine)", "",
             "| shape | dtype | ours (s) | dense chain (s) | efficiency (goal ≥ 0.8) | compete / normal | bound (N+3K)/3K "
             "| ratio / bound (goal ≤ 1.0) | ratio / (N+4K)/3K | peak tensor memory compete / normal (goal ≤ 1.2) "
             "| resident peak compete / normal |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['ours_s']:.4f} | {r['dense_s']:.4f} | {r['efficiency']:.2f} "
                     f"| {r['compete_ratio']:.2f} | {r['compete_bound']:.2f} | {r['compete_ratio'] / r['compete_bound']:.2f} "
                     f"| {r['compete_ratio'] / r['compete_bound_recompute']:.2f} "
                     f"| {r.get('memory_ratio', float('nan')):.2f} ({r.get('compete_MiB', 0):.0f} / {r.get('normal_MiB', 0):.0f} MiB) "
                     f"| {r.get('resident_memory_ratio', float('nan')):.2f} ({r.get('resident_compete_MiB', 0):.0f} / "
                     f"{r.get('resident_normal_MiB', 0):.0f} MiB) |")
    others = [k[len("ours_"):-2] for k in results[0] if k.startswith("ours_") and k not in ("ours_s", "ours_swiglu_s")]
    if others:
        lines += ["", "Expert dispatch backends (same layer, same weights; `auto` picks "
                  + ("the Triton kernels on CUDA" if args.device == "cuda" else "the loop on CPU") + "):", "",
                  "| shape | dtype | auto (s) | " + " | ".join(f"{b} (s)" for b in others) + " |",
                  "|---|---|---|" + "---|" * len(others)]
        for r in results:
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['ours_s']:.4f} | "
                         + " | ".join(f"{r[f'ours_{b}_s']:.4f}" for b in others) + " |")
    impls = [k[len("speedup_vs_hf_"):] for k in results[0] if k.startswith("speedup_vs_hf_")]
    if not impls:
        return "\n".join(lines) + "\n"
    lines += ["", "Speed-up over transformers' `MixtralSparseMoeBlock` (SwiGLU experts, same weights; "
              "goal ≥ 1.5× default and ≥ 1.0× fastest at coarse, ≥ 3× default at fine):", "",
              "| shape | dtype | ours (s) | " + " | ".join(f"HF {i} (s) | speed-up vs {i}" for i in impls) + " | max |out diff| |",
              "|---|---|---|" + "---|---|" * len(impls) + "---|"]
    for r in results:
        cells = " | ".join(f"{r[f'hf_{i}_s']:.4f} | {r[f'speedup_vs_hf_{i}']:.2f}×" for i in impls)
        diff = max(r[f"hf_{i}_maxdiff"] for i in impls)
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['ours_swiglu_s']:.4f} | {cells} | {diff:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="fine,coarse")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--hf", default="eager,batched_mm,grouped_mm", help="transformers experts implementations")
    p.add_argument("--backends", default="auto", help="expert dispatch backends to time besides auto, e.g. auto,grouped_mm")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--probes", type=int, default=3, help="CPU: fresh processes per memory probe (median)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", help="write the Markdown report here (and the raw numbers next to it as .json)")
    p.add_argument("--_memprobe", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._memprobe:
        shape, dt, tokens, compete = args._memprobe
        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(memory_probe(shape, dt, "cpu", int(tokens), bool(int(compete)))))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    args.load_start = os.getloadavg()[0]
    torch.manual_seed(0)
    hf_impls = [i for i in args.hf.split(",") if i]
    results = []
    for shape in args.shapes.split(","):
        for dt in args.dtypes.split(","):
            r = bench_shape(shape, dt, args.device, args.tokens, args.repeats, hf_impls, args.backends.split(","))
            if not args.no_memory:
                r.update(memory_ratio(shape, dt, args.device, args.tokens, args.probes))
            print(json.dumps(r), flush=True)
            results.append(r)
    text = report(results, args, hf_default_implementation())
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        with open(args.out.rsplit(".", 1)[0] + ".json", "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
