"""`Experts.mix` (weights folded into the second matmul, one index_add into the tokens) on the CPU paths
against a naive per-token loop: output and every gradient, routing weights included."""
from __future__ import annotations

import pytest
import torch

import reference as ref
from competesmoe.moe.experts import Experts


@pytest.mark.parametrize("width", [8, 32], ids=["weights-fold-into-phi", "weights-scale-outputs"])  # H vs D=16
@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
@pytest.mark.parametrize("activation,bias", [("relu", False), ("swiglu", True), ("gelu", True)])
def test_mix_matches_naive_weighted_sum_and_gradients(backend, activation, bias, width):
    dtype = torch.float32 if backend == "grouped_mm" else torch.float64   # grouped_mm: fp32/bf16 only
    ex = Experts(5, 16, width, activation, bias, backend=backend).to(dtype)
    if bias:
        with torch.no_grad():
            ex.b1.normal_()
            ex.b2.normal_()
    x = torch.randn(9, 16, dtype=dtype, requires_grad=True)
    idx = torch.stack([torch.randperm(5)[:3] for _ in range(9)])
    w = torch.rand(9, 3, dtype=dtype, requires_grad=True)
    params = [x, w] + list(ex.parameters())
    g = torch.randn(9, 16, dtype=dtype)
    got = ex.mix(x, idx, w)
    grads = torch.autograd.grad((got * g).sum(), params)
    want = ref.sparse_moe(ex, x, idx, w)
    want_grads = torch.autograd.grad((want * g).sum(), params)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(got, want, **tol)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, **tol)


def test_mix_gradcheck_float64():
    ex = Experts(3, 8, 4, "gelu", True, backend="loop").double()
    idx = torch.tensor([[0, 2], [1, 0], [2, 2], [0, 1]])
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    w = torch.rand(4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: ex.mix(x, idx, w), (x, w))


def test_mix_equals_combine_of_forward_in_bf16():
    ex = Experts(4, 16, 16, "relu")
    x, idx, w = torch.randn(6, 16), torch.randint(0, 4, (6, 2)), torch.rand(6, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = ex.mix(x, idx, w), Experts.combine(ex(x, idx), w)
    assert a.dtype == b.dtype == torch.bfloat16
    torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("width", [8, 32])
def test_grouped_mm_and_loop_backends_agree_bitwise(width):
    """A model whose loaded weights lose 16-byte alignment falls back to the loop: same bits either way."""
    a = Experts(4, 16, width, "swiglu", True, backend="grouped_mm")
    b = Experts(4, 16, width, "swiglu", True, backend="loop")
    b.load_state_dict(a.state_dict())
    x, idx, w = torch.randn(10, 16), torch.randint(0, 4, (10, 2)), torch.rand(10, 2)
    assert torch.equal(a.mix(x, idx, w), b.mix(x, idx, w))
    assert torch.equal(a(x, idx), b(x, idx))
