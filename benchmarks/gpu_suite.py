"""Every GPU benchmark of the speed issue in one run, bounded in time; Markdown + JSON into OUT_DIR.

    bash benchmarks/gpu_suite.sh OUT_DIR            # one GPU, at most ~6 minutes (H200)
    bash benchmarks/gpu_suite.sh OUT_DIR --smoke    # minutes on CPU: proves the pipeline end to end

Parts, each a subprocess with its own time limit (a part that runs out keeps what it printed so far):
  0. kernels     the Triton kernels' tests on this GPU (tests/test_kernels.py, the triton cases of
                 tests/test_dispatch.py): correctness before any timing (`auto` never picks Triton; read
                 kernels.log before setting backend=triton)
  1. layer       benchmarks/moe_layer.py: fine (64×128, K 8) and coarse (8×1024 SwiGLU, K 2) at 65,536 tokens,
                 fp32 and bf16: efficiency vs a dense chain of equal FLOPs, each dispatch backend, transformers'
                 Mixtral block (default grouped_mm and eager), competition step time and peak memory
  2. train       benchmarks/train_throughput.py: paper-151m, 64×1024 tokens per step, tokens/s, MFU and peak
                 memory for the seven routers and CompeteSMoE at ω 0.5 (FLOP-implied overhead from the
                 schedule's real competing layer-steps, A_max included)
  3. compile     the same for smoe with train.compile=true
then summary.md / summary.json: the issue's table filled from those numbers.
Runs from source (PYTHONPATH=src, set by gpu_suite.sh); needs torch and transformers only.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
H200_BF16_TFLOPS = 989.0          # dense bf16 peak of an H100/H200 SXM (no sparsity)
ROUTERS = "smoe,competesmoe,competesmoe:train.schedule.omega=0.5,xmoe,pcosine,moeut,sharede_v2,sharede_v3"


def parts(out: Path, smoke: bool) -> list[tuple[str, list[str], int]]:
    """(name, argv, time limit in s). Limits sum to the 6-minute budget on an H200."""
    py = sys.executable
    if smoke:
        tiny = ["--set", "model.n_layers=2", "--set", "data.synthetic_train_chars=200000",
                "--set", "data.vocab_size=384", "--set", "model.vocab_size=384", "--set", "train.batch_size=4"]
        return [
            ("kernels", [py, "-m", "pytest", "-q", "-x", "tests/test_kernels.py", "-k", "routing or offsets"], 300),
            ("layer", [py, str(HERE / "moe_layer.py"), "--device", "cpu", "--tokens", "256", "--repeats", "1",
                       "--dtypes", "bf16", "--hf", "eager", "--backends", "auto,loop", "--probes", "1",
                       "--out", str(out / "moe_layer-smoke.md")], 600),
            ("train", [py, str(HERE / "train_throughput.py"), "--preset", "tiny", "--routers", ROUTERS,
                       "--rounds", "1", "--steps", "4", "--log-every", "2", *tiny, "--peak-tflops", "1",
                       "--out", str(out / "train-smoke.md")], 400),
            ("compile", [py, str(HERE / "train_throughput.py"), "--preset", "tiny", "--routers",
                         "smoe:train.compile=true", "--rounds", "1", "--steps", "4", "--log-every", "2", *tiny,
                         "--set", "model.n_layers=1", "--peak-tflops", "1",
                         "--out", str(out / "train-compile-smoke.md")], 400),
        ]
    paper = ["--preset", "paper-151m", "--rounds", "1", "--steps", "12", "--log-every", "3",
             "--set", "train.grad_accum=1", "--set", "data.synthetic_train_chars=6000000",
             "--set", "data.progress=false", "--peak-tflops", str(H200_BF16_TFLOPS)]
    return [
        ("kernels", [py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_kernels.py",
                     "tests/test_dispatch.py", "-k", "triton or fused or offsets or routing or bias"], 90),
        ("layer", [py, str(HERE / "moe_layer.py"), "--device", "cuda", "--tokens", "65536", "--repeats", "20",
                   "--hf", "eager,grouped_mm", "--backends", "auto,grouped_mm,triton",
                   "--out", str(out / "moe_layer-cuda.md")], 130),
        ("train", [py, str(HERE / "train_throughput.py"), "--routers", ROUTERS, *paper,
                   "--out", str(out / "train-paper-151m-cuda.md")], 150),
        ("compile", [py, str(HERE / "train_throughput.py"), "--routers", "smoe:train.compile=true", *paper,
                     "--out", str(out / "train-paper-151m-compile-cuda.md")], 80),
    ]


def run_part(name: str, argv: list[str], limit: int, out: Path) -> dict:
    t0 = time.time()
    with open(out / f"{name}.log", "w") as log:
        try:
            proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=log, text=True, timeout=limit, cwd=HERE.parent)
            stdout, rc = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as e:
            stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            rc = "timeout"
        log.write(stdout)
    status = {"part": name, "rc": rc, "seconds": round(time.time() - t0, 1), "limit_s": limit}
    print(json.dumps(status), file=sys.stderr, flush=True)
    # moe_layer prints one JSON line per (shape, dtype) as it goes: keep them even after a timeout.
    status["rows"] = [json.loads(l) for l in stdout.splitlines() if l.startswith('{"shape"')]
    return status


def _fmt(v, spec=".2f", suffix=""):
    return "–" if v is None else f"{v:{spec}}{suffix}"


def summary(out: Path, results: dict, smoke: bool) -> list[str]:
    """The issue's table from the parts' numbers."""
    rows = {(r["shape"], r["dtype"]): r for r in results["layer"]["rows"]}
    train = json.loads((out / ("train-smoke.json" if smoke else "train-paper-151m-cuda.json")).read_text()) \
        if (out / ("train-smoke.json" if smoke else "train-paper-151m-cuda.json")).exists() else {}
    comp_file = out / ("train-compile-smoke.json" if smoke else "train-paper-151m-compile-cuda.json")
    compiled = json.loads(comp_file.read_text()) if comp_file.exists() else {}

    def layer(shape, dtype, key):
        return rows.get((shape, dtype), {}).get(key)

    lines = ["| | measured | goal |", "|---|---|---|"]
    for shape, goal in (("fine", "≥ 0.5"), ("coarse", "≥ 0.8")):
        lines.append(f"| {shape} layer fwd+bwd, efficiency vs dense chain (bf16 / fp32) | "
                     f"{_fmt(layer(shape, 'bf16', 'efficiency'))} / {_fmt(layer(shape, 'fp32', 'efficiency'))} "
                     f"({_fmt(layer(shape, 'bf16', 'ours_s'), '.4f')} s vs {_fmt(layer(shape, 'bf16', 'dense_s'), '.4f')} s bf16) | {goal} |")
    for shape in ("fine", "coarse"):
        lines.append(f"| {shape}: speed-up vs transformers' Mixtral block, grouped_mm / eager (bf16) | "
                     f"{_fmt(layer(shape, 'bf16', 'speedup_vs_hf_grouped_mm'), '.2f', '×')} / "
                     f"{_fmt(layer(shape, 'bf16', 'speedup_vs_hf_eager'), '.2f', '×')} | ≥ 1 both |")
    for shape in ("fine", "coarse"):
        lines.append(f"| {shape}: competition step peak memory / normal step (bf16) | "
                     f"{_fmt(layer(shape, 'bf16', 'memory_ratio'), '.2f', '×')} "
                     f"({_fmt(layer(shape, 'bf16', 'compete_MiB'), '.0f')} / {_fmt(layer(shape, 'bf16', 'normal_MiB'), '.0f')} MiB) | ≤ 1.2× |")
    for shape in ("fine", "coarse"):
        r, b = layer(shape, "bf16", "compete_ratio"), layer(shape, "bf16", "compete_bound")
        b4 = layer(shape, "bf16", "compete_bound_recompute")
        lines.append(f"| {shape}: competition step time / normal, vs the bound (N+3K)/3K (bf16; in brackets vs "
                     f"(N+4K)/3K, which counts recompute_winners' extra winners forward) | "
                     f"{_fmt(r / b if r and b else None, '.2f', '×')} ({_fmt(r / b4 if r and b4 else None, '.2f', '×')}) "
                     f"of the bound | ≤ 1.0× |")
    s = train.get("smoe", {})
    lines.append(f"| {'tiny (smoke)' if smoke else '`paper-151m`'} training, smoe: tokens/s, MFU, peak memory | "
                 f"{_fmt(s.get('tokens_per_s'), ',.0f')}, {_fmt(s.get('mfu'), '.1%')}, {_fmt(s.get('peak_GiB'), '.1f', ' GiB')} | ≥ 30% MFU |")
    c = next(iter(compiled.values()), {})
    lines.append(f"| same with train.compile=true | {_fmt(c.get('tokens_per_s'), ',.0f')}, {_fmt(c.get('mfu'), '.1%')}, "
                 f"{_fmt(c.get('peak_GiB'), '.1f', ' GiB')} | |")
    for key, label in (("competesmoe", "ω 0.07"), ("competesmoe:train.schedule.omega=0.5", "ω 0.5")):
        r = train.get(key, {})
        lines.append(f"| CompeteSMoE ({label}) training overhead vs SMoE (FLOP-implied, competing layers/step) | "
                     f"{_fmt(r.get('slowdown'), '+.1%')} ({_fmt(r.get('implied_overhead'), '+.1%')}, "
                     f"{_fmt(r.get('competing_layers_per_step'), '.2f')}) | ≤ FLOP-implied |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of the whole pipeline")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("gpu_suite: no CUDA device (use --smoke for the CPU dry run)")
    t0 = time.time()
    results = {name: run_part(name, argv, limit, out) for name, argv, limit in parts(out, args.smoke)}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "CPU (smoke)"
    lines = [f"# GPU suite{' (smoke run on CPU: sizes are tiny, numbers mean nothing)' if args.smoke else ''}", "",
             f"- command: `bash benchmarks/gpu_suite.sh {' '.join(sys.argv[2:] if sys.argv[1] == '--out' else sys.argv[1:])}`",
             f"- date: {datetime.date.today()}, {device}, torch {torch.__version__}, total {time.time() - t0:.0f} s",
             "- parts: " + ", ".join(f"{r['part']} ({r['rc']}, {r['seconds']} s of {r['limit_s']})" for r in results.values()),
             "- details: moe_layer-*.md, train-*.md (and their .json) in this folder", "", *summary(out, results, args.smoke)]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({k: {kk: vv for kk, vv in v.items()} for k, v in results.items()},
                                                 indent=1))
    print(text)
    failed = [r["part"] for r in results.values() if r["rc"] != 0]
    if failed:
        sys.exit(f"gpu_suite: parts that did not finish: {', '.join(failed)} (see their .log in {out})")


if __name__ == "__main__":
    main()
