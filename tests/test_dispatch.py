"""`Experts.mix` (weights folded into the second matmul, one index_add into the tokens) on the CPU paths
against a naive per-token loop: output and every gradient, routing weights included."""
from __future__ import annotations

import pytest
import torch

import reference as ref
from competesmoe.moe.experts import Experts
from competesmoe.moe.kernels.looped import looped_experts


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



@pytest.mark.parametrize("activation,width,weighted", [
    ("gelu", 4, True), ("swiglu", 12, True), ("relu", 12, False), ("silu", 4, False)],
    ids=["fold", "swiglu-scale-outputs", "unweighted-wide", "unweighted-narrow"])
@pytest.mark.parametrize("act_grad", ["table", "autograd"])
def test_loop_gradcheck_float64_every_input(activation, width, weighted, act_grad):
    """The looped dispatch's hand-written backward: x, routing weights, W1, b1, W2, b2 (D = 8), with the
    experts' activation derivatives and with autograd through the activation (the default)."""
    ex = Experts(3, 8, width, activation, True, backend="loop").double()
    idx = torch.tensor([[0, 2], [1, 0], [2, 2], [0, 0], [1, 0]])    # expert 1 gets 2 pairs, one token twice
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.rand(5, 2, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().normal_().requires_grad_() for p in (ex.w1, ex.b1, ex.w2, ex.b2)]
    grad_fn = ex._act_grad if act_grad == "table" else None

    def f(x, w, w1, b1, w2, b2):
        return looped_experts(x, w1, b1, w2, b2, idx, ex._act, w if weighted else None, grad_fn)
    assert torch.autograd.gradcheck(f, (x, w, *params))


def test_loop_unused_experts_get_zero_gradients_and_no_tokens_is_fine():
    ex = Experts(6, 16, 8, "swiglu", True, backend="loop")
    x = torch.randn(7, 16)
    y = ex.mix(x, torch.randint(0, 3, (7, 2)), torch.rand(7, 2))     # experts 3..5 receive nothing
    y.square().sum().backward()
    for p in ex.parameters():
        assert torch.equal(p.grad[3:], torch.zeros_like(p.grad[3:]))
        assert p.grad[:3].abs().sum() > 0
    x0 = torch.randn(0, 16, requires_grad=True)
    y0 = ex.mix(x0, torch.zeros(0, 2, dtype=torch.long), torch.rand(0, 2))
    assert y0.shape == (0, 16)
    y0.sum().backward()
    assert x0.grad.shape == (0, 16)


@pytest.mark.parametrize("weighted", [True, False])
def test_loop_keeps_only_pre_activations_for_backward(weighted):
    """No [T·K, D] buffer survives the forward: besides its inputs, the loop saves h [T·K, H_in] and the
    sorted pairs' weights and order. The grouped path keeps the gathered tokens and more."""
    T, K, D, H, N = 64, 4, 32, 16, 8
    x, idx, w = torch.randn(T, D, requires_grad=True), torch.randint(0, N, (T, K)), torch.rand(T, K)

    def saved_bytes(backend):
        ex = Experts(N, D, H, "relu", backend=backend)
        with ref.saved_storages(exclude=[x, *ex.parameters()]) as seen:
            ex.mix(x, idx, w) if weighted else ex(x, idx)
        return sum(seen.values())
    saved = {b: saved_bytes(b) for b in ("loop", "grouped_mm")}
    M = T * K
    assert saved["loop"] <= (M * H + 2 * M) * 4 + M * 8          # h, scale (fp32), order (int64)
    assert saved["grouped_mm"] >= M * D * 4                         # at least the gathered tokens


def test_loop_without_a_graph_keeps_no_pre_activations():
    """Inference: the same output, and the loop allocates one expert's pre-activations, not [T·K, H]."""
    ex = Experts(4, 32, 64, "gelu", backend="loop")
    x, idx, w = torch.randn(256, 32), torch.randint(0, 4, (256, 2)), torch.rand(256, 2)
    want = ex.mix(x, idx, w)
    sizes = []
    real = torch.Tensor.new_empty
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "new_empty", lambda self, *s, **k: sizes.append(tuple(s)) or real(self, *s, **k))
        got = ex.mix(x, idx, w)
    assert torch.equal(got, want.detach())
    assert (512, 64) not in sizes and max(s[0] for s in sizes) <= int(torch.bincount(idx.reshape(-1)).max())
