"""The fused Triton dispatch (moe/kernels/triton_moe.py) against naive per-token loops.

Runs on CPU through the Triton interpreter (TRITON_INTERPRET=1, which tests/conftest.py sets before
triton is first imported), so CI covers the kernels without a GPU; on a CUDA machine the same tests run
the compiled ones.
Outputs and every gradient (x, W1, W2, biases, routing weights) in float32 and bfloat16.
"""
from __future__ import annotations

import os

import pytest
import torch

import reference as ref
from competesmoe import MoE, MoEConfig
from competesmoe.moe.experts import Experts
from competesmoe.moe.kernels import triton_moe as tm

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# (T, D, H, N, K): uneven sizes (masks), K = 1, experts that receive no token (N > T·K), and (last) ≥ 3 row
# blocks per expert and several column blocks at odd, non-power-of-two sizes (the interpreter's blocks are
# 16 wide: ~50 pairs per expert, D 40, H 24), so the kernels' outer loops run as they would on a GPU.
SHAPES = [(7, 24, 20, 4, 2), (5, 16, 16, 3, 1), (3, 16, 12, 9, 2), (75, 40, 24, 3, 2)]


def _experts(n, d, h, activation, bias):
    ex = Experts(n, d, h, activation, bias).to(DEV)
    if bias:
        with torch.no_grad():
            ex.b1.normal_()
            ex.b2.normal_()
    return ex


def _naive(ex, x_TD, idx_TK, w_TK=None):
    """Per token and choice, in float64: out_TKD, or Σ_k w_tk out_tk."""
    T, K = idx_TK.shape
    out = torch.stack([torch.stack([ref.expert_out(ex, int(idx_TK[t, k]), x_TD[t]) for k in range(K)])
                       for t in range(T)])
    return out if w_TK is None else (w_TK[..., None] * out).sum(1)


def _check(shape, activation, bias, dtype, weighted):
    T, D, H, N, K = shape
    ex = _experts(N, D, H, activation, bias)
    x = torch.randn(T, D, device=DEV)
    idx = torch.stack([torch.randperm(N)[:K] for _ in range(T)]).to(DEV)
    w = torch.rand(T, K, device=DEV) if weighted else None
    # The kernels take the compute dtype; the reference runs in float64 on the same (rounded) values.
    leaves = {"x": x, "w1": ex.w1, "w2": ex.w2, "b1": ex.b1, "b2": ex.b2, "w": w}
    low = {k: None if v is None else v.detach().to(dtype).requires_grad_() for k, v in leaves.items()}
    hi = {k: None if v is None else v.detach().to(dtype).double().requires_grad_() for k, v in leaves.items()}
    got = tm.fused_experts(low["x"], low["w1"], low["b1"], low["w2"], low["b2"], idx, ex.act.key, low["w"])
    ref_ex = _experts(N, D, H, activation, bias).double()
    for name in ("w1", "w2", "b1", "b2"):
        if hi[name] is not None:
            hi[name] = torch.nn.Parameter(hi[name].detach())
            setattr(ref_ex, name, hi[name])
    want = _naive(ref_ex, hi["x"], idx, hi["w"])
    assert got.dtype == dtype and got.shape == want.shape
    g_out = torch.randn(want.shape, dtype=torch.float64, device=DEV)
    (got.double() * g_out).sum().backward()
    (want * g_out).sum().backward()
    # bf16: one rounding of h, φ(h), the outputs and each gradient (8 bits of mantissa), relative to scale.
    rtol = 1e-5 if dtype == torch.float32 else 3e-2
    pairs = [("out", got.double(), want)] + [(k, low[k].grad, hi[k].grad) for k in leaves if low[k] is not None]
    for name, a, b in pairs:
        assert a is not None, f"no gradient for {name}"
        scale = b.abs().max().item() + 1e-12
        torch.testing.assert_close(a.double(), b.detach(), rtol=0, atol=rtol * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "per-pair"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("activation,bias", [("relu", False), ("gelu", True), ("swiglu", True)])
def test_fused_dispatch_matches_naive_loop(activation, bias, dtype, weighted):
    _check(SHAPES[0], activation, bias, dtype, weighted)


@pytest.mark.parametrize("shape", SHAPES[1:], ids=lambda s: "T{}_D{}_H{}_N{}_K{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_dispatch_shapes(shape, dtype):
    _check(shape, "relu", True, dtype, weighted=True)


def test_several_blocks_per_expert_actually_run():
    """The multi-block shape gives every expert ≥ 3 row blocks (else the test above proves less)."""
    T, D, H, N, K = SHAPES[-1]
    torch.manual_seed(0)
    idx = torch.stack([torch.randperm(N)[:K] for _ in range(T)])
    r = tm.Routing(idx, N, tm.block_sizes(torch.float32)[0])
    per_expert = torch.bincount(r.blk_e[r.blk_e >= 0].long(), minlength=N)
    assert per_expert.min() >= 3 and D > tm.block_sizes(torch.float32)[1] * 2


def test_non_contiguous_bias():
    """A bias that is a strided view (e.g. every other row of a bigger tensor) is read through its strides."""
    T, D, H, N, K = 9, 16, 16, 3, 2
    ex = _experts(N, D, H, "gelu", True)
    x, idx, w = torch.randn(T, D, device=DEV), torch.randint(0, N, (T, K), device=DEV), torch.rand(T, K, device=DEV)
    b1 = torch.randn(N, 2 * H, device=DEV)[:, ::2]                # column stride 2
    b2 = torch.randn(2 * N, D, device=DEV)[::2]                   # row stride 2·D
    assert not b1.is_contiguous() and not b2.is_contiguous()
    got = tm.fused_experts(x, ex.w1.detach(), b1, ex.w2.detach(), b2, idx, ex.act.key, w)
    want = tm.fused_experts(x, ex.w1.detach(), b1.contiguous(), ex.w2.detach(), b2.contiguous(), idx, ex.act.key, w)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    ex.b1.data, ex.b2.data = b1.contiguous(), b2.contiguous()
    torch.testing.assert_close(got, _naive(ex.double(), x.double(), idx, w.double()).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not tm.available(torch.device(DEV)), reason="needs CUDA or the Triton interpreter")
def test_offsets_are_64_bit():
    """Every offset goes through `_at`: an expert index times a per-expert stride past 2³¹ (64 experts ×
    14336 × 4096 elements of W2's gradient) must not wrap. Checked on the helper itself (allocating 2³¹
    elements is not possible here), and every kernel's pointer arithmetic is required to use it."""
    import inspect
    import re

    import triton
    import triton.language as tl

    @triton.jit
    def probe(e_ptr, out_ptr, stride):
        e = tl.load(e_ptr + tl.arange(0, 4))
        tl.store(out_ptr + tl.arange(0, 4), tm._at(e, stride))
    e = torch.tensor([0, 1, 63, 2**20], dtype=torch.int32, device=DEV)
    out = torch.empty(4, dtype=torch.int64, device=DEV)
    stride = 14336 * 4096
    probe[(1,)](e, out, stride)
    assert out.tolist() == [int(v) * stride for v in e.tolist()]
    for kernel in (tm._gmm_kernel, tm._outer_kernel):
        src = inspect.getsource(kernel.fn)
        products = re.findall(r"\w+\s*\*\s*s_\w+", src)             # index * stride written without _at
        assert products == [], f"{kernel.fn.__name__}: {products}"


def test_routing_blocks_cover_every_pair_once():
    idx = torch.tensor([[2, 0], [2, 1], [0, 2], [2, 1], [2, 0]], device=DEV)   # expert 3 gets none
    r = tm.Routing(idx, 4, block_m=2)
    rows = []
    for e, s, end in zip(r.blk_e.tolist(), r.blk_start.tolist(), r.blk_end.tolist()):
        if e >= 0:
            assert end - s >= 1
            rows += [(e, m) for m in range(s, min(s + 2, end))]
    assert sorted(m for _, m in rows) == list(range(10))                # each sorted row exactly once
    for e, m in rows:
        assert int(idx.reshape(-1)[r.pair_M[m]]) == e                    # ... in its expert's block
    assert r.n_blocks >= sum(1 for e in r.blk_e.tolist() if e >= 0)


@pytest.mark.parametrize("backend", ["triton", "loop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_moe_layer_backend_equals_grouped_mm(dtype, backend):
    """The whole layer (normal and competition steps) under autocast: same outputs and gradients."""
    cfg = dict(d_model=16, d_expert=16, n_experts=4, top_k=2, router="competesmoe", activation="gelu")
    ref_moe = MoE(MoEConfig(**cfg, backend="grouped_mm")).to(DEV).train()
    tri = MoE(MoEConfig(**cfg, backend=backend)).to(DEV).train()
    tri.load_state_dict(ref_moe.state_dict())
    x = torch.randn(2, 5, 16, device=DEV)
    for compete in (False, True):
        grads = []
        for m in (ref_moe, tri):
            m.zero_grad()
            with torch.autocast(DEV, dtype=dtype, enabled=dtype != torch.float32):
                out = m(x, compete=compete)
                (out.y.float().square().sum() + out.aux_loss).backward()
            grads.append([out.y.float()] + [p.grad.float() for p in m.parameters()])
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, **tol)


def test_triton_backend_unavailable_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(tm, "available", lambda device: False)
    ex = Experts(2, 16, 16, backend="triton")
    with pytest.raises(RuntimeError, match="backend='triton' is not possible here"):
        ex(torch.randn(3, 16), torch.zeros(3, 1, dtype=torch.long))


def test_auto_backend_keeps_the_reference_path_on_cpu(monkeypatch):
    called = []
    monkeypatch.setattr(tm, "fused_experts", lambda *a, **k: called.append(1))
    ex = Experts(2, 16, 16)
    ex.mix(torch.randn(3, 16), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))
    assert called == [] or torch.cuda.is_available()


COMPILE_FOR_H100 = r'''
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from competesmoe.moe.kernels import triton_moe as tm

def build(kernel, types, consts):
    types = dict(types, **{k: "constexpr" for k in consts})
    consts = {(kernel.arg_names.index(k),): v for k, v in consts.items()}
    triton.compile(ASTSource(fn=kernel, signature=types, constexprs=consts), target=GPUTarget("cuda", 90, 32))

for dt, (bm, bn, bk) in (("bf16", tm.block_sizes(torch.bfloat16)),):     # the training path (fp32 shares the code)
    p = "*" + dt
    build(tm._gmm_kernel, {"x_ptr": p, "src_ptr": "*i32", "w_ptr": p, "b_ptr": p, "scale_ptr": p, "dst_ptr": "*i32",
                           "out_ptr": p, "blk_e_ptr": "*i32", "blk_start_ptr": "*i32", "blk_end_ptr": "*i32",
                           "KD": "i32", "ND": "i32", **{n: "i32" for n in tm._gmm_kernel.arg_names if n.startswith("s_")}},
          dict(HAS_SRC=True, HAS_BIAS=True, HAS_SCALE=True, HAS_DST=True, BM=bm, BN=bn, BK=bk,
               IEEE=dt == "fp32", UPCAST=False))
    build(tm._outer_kernel, {"a_ptr": p, "a_src_ptr": "*i32", "a_scale_ptr": p, "b_ptr": p, "b_src_ptr": "*i32",
                             "out_ptr": p, "start_ptr": "*i32", "count_ptr": "*i32", "P": "i32", "Q": "i32",
                             **{n: "i32" for n in tm._outer_kernel.arg_names if n.startswith("s_")}},
          dict(HAS_ASRC=True, HAS_ASCALE=True, HAS_BSRC=True, BP=bm, BQ=bn, BK=bk, IEEE=dt == "fp32", UPCAST=False))
print("compiled")
'''


def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter does not type-check like the compiler: build the real kernels for an H100/H200
    (sm_90, through Triton's bundled ptxas) so that a GPU-only compile error cannot hide."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, "-c", COMPILE_FOR_H100], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]
