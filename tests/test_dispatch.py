"""Every dispatch path (loop, grouped_mm, Triton interpreted) with every activation a supported family uses,
against autograd through a naive per-token loop: outputs and the gradients of x, the routing weights, W1,
b1, W2 and b2. The activations are the config's built-ins and transformers' own modules (through
`activations.of`, as an upcycled model gets them), gated and plain, with d_out ≠ d_in and d_out = d_in.
"""
from __future__ import annotations

import pytest
import torch
from transformers.activations import ACT2FN

import reference as ref
from competesmoe.moe import activations
from competesmoe.moe.experts import Experts
from competesmoe.moe.kernels import triton_moe
from competesmoe.moe.kernels.looped import looped_experts

# id -> (the Activation the experts get, the reference's name for φ)
ACTS = {
    "relu": (lambda: "relu", "relu"),
    "gelu": (lambda: "gelu", "gelu"),
    "gelu_tanh": (lambda: "gelu_tanh", "gelu_tanh"),
    "silu": (lambda: "silu", "silu"),
    "quick_gelu": (lambda: "quick_gelu", "quick_gelu"),
    "swiglu": (lambda: "swiglu", "swiglu"),
    "geglu_tanh": (lambda: "geglu_tanh", "geglu_tanh"),
    # transformers' modules, as upcycling finds them (GPT-2, Llama, Gemma, CLIP, SigLIP, ...)
    "hf-gelu_new": (lambda: activations.of(ACT2FN["gelu_new"], gated=False), "gelu_tanh"),
    "hf-gelu_pytorch_tanh": (lambda: activations.of(ACT2FN["gelu_pytorch_tanh"], gated=False), "gelu_tanh"),
    "hf-gelu": (lambda: activations.of(ACT2FN["gelu"], gated=False), "gelu"),
    "hf-quick_gelu": (lambda: activations.of(ACT2FN["quick_gelu"], gated=False), "quick_gelu"),
    "hf-relu": (lambda: activations.of(ACT2FN["relu"], gated=False), "relu"),
    "hf-gated-silu": (lambda: activations.of(ACT2FN["silu"], gated=True), "swiglu"),
    "hf-gated-gelu_pytorch_tanh": (lambda: activations.of(ACT2FN["gelu_pytorch_tanh"], gated=True), "geglu_tanh"),
    "hf-tanh (autograd)": (lambda: activations.of(ACT2FN["tanh"], gated=False), "tanh"),
}
PATHS = ["loop", "grouped_mm"] + (["triton"] if triton_moe is not None and triton_moe.available(torch.device("cpu")) else [])


def _experts(act, backend, d_out, dtype, bias=True):
    ex = Experts(5, 16, 8, act, bias, backend=backend, d_out=d_out)
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0, 0.5)
    return ex.to(dtype)


@pytest.mark.parametrize("d_out", [16, 24], ids=["d_out=d_in", "d_out>d_in"])
@pytest.mark.parametrize("weighted", [True, False], ids=["mix", "per-pair"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("act_id", list(ACTS))
def test_every_path_and_activation_matches_a_naive_loop(act_id, path, weighted, d_out):
    make, ref_name = ACTS[act_id]
    dtype = torch.float64 if path == "loop" else torch.float32     # grouped_mm and Triton: fp32 / bf16
    ex = _experts(make(), path, d_out, dtype)
    T, K = 11, 2
    x = torch.randn(T, 16, dtype=dtype, requires_grad=True)
    idx = torch.stack([torch.randperm(5)[:K] for _ in range(T)])
    idx[:, 0] = torch.where(idx[:, 0] == 4, 3, idx[:, 0])            # expert 4: fewer pairs, maybe none
    w = torch.rand(T, K, dtype=dtype, requires_grad=True)
    names = ["x", "w"] + [n for n, _ in ex.named_parameters()]
    params = [x, w] + [p for _, p in ex.named_parameters()]
    got = ex.mix(x, idx, w) if weighted else ex(x, idx)
    g = torch.randn_like(got)
    grads = torch.autograd.grad((got * g).sum(), params, allow_unused=True)

    hi = [p.detach().double().requires_grad_() for p in params[:2]] + [torch.nn.Parameter(p.detach().double())
                                                                        for p in params[2:]]
    ref_ex = _experts(make(), "loop", d_out, torch.float64)
    for name, p in zip(names[2:], hi[2:]):
        setattr(ref_ex, name, p)
    if weighted:
        want = ref.sparse_moe(ref_ex, hi[0], idx, hi[1], ref_name)
    else:
        want = torch.stack([torch.stack([ref.expert_out(ref_ex, int(idx[t, k]), hi[0][t], ref_name) for k in range(K)])
                            for t in range(T)])
    want_grads = torch.autograd.grad((want * g.double()).sum(), hi, allow_unused=True)
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(got.double(), want, **tol)
    assert names == ["x", "w", "w1", "w2", "b1", "b2"]
    for name, a, b in zip(names, grads, want_grads):
        if name == "w" and not weighted:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a.double(), b, **tol, msg=lambda m: f"d{name}: {m}")


def test_identified_activations_use_the_closed_form_and_others_autograd():
    """`activations.of` trusts a built-in derivative only where values and derivatives match."""
    assert activations.of(ACT2FN["gelu_new"], False).grad_fn is activations.BUILTIN["gelu_tanh"][1]
    assert activations.of(ACT2FN["gelu"], False).grad_fn is activations.BUILTIN["gelu"][1]
    assert activations.of(ACT2FN["quick_gelu"], False).grad_fn is activations.BUILTIN["quick_gelu"][1]
    assert activations.of(ACT2FN["tanh"], False).grad_fn is None
    assert not activations.same_function(ACT2FN["gelu_new"], "gelu")          # tanh-GELU is not exact GELU
    assert not activations.same_function(lambda h: h.float(), "relu")


def test_gemma_style_gated_gelu_tanh_loop_equals_grouped_mm():
    """The defect this contract fixes: an upcycled gated GELU-tanh MLP got SiLU's derivative on the loop."""
    phi = activations.of(ACT2FN["gelu_pytorch_tanh"], gated=True)
    a = Experts(4, 16, 32, phi, backend="grouped_mm")
    b = Experts(4, 16, 32, phi, backend="loop")
    b.load_state_dict(a.state_dict())
    x, idx, w = torch.randn(64, 16), torch.randint(0, 4, (64, 2)), torch.rand(64, 2)
    grads = []
    for ex in (a, b):
        xx = x.clone().requires_grad_()
        ex.mix(xx, idx, w).square().sum().backward()
        grads.append([xx.grad, ex.w1.grad, ex.w2.grad])
    for ga, gb in zip(*grads):
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("act_id", ["relu", "gelu", "gelu_tanh", "silu", "quick_gelu", "swiglu", "geglu_tanh",
                                    "hf-tanh (autograd)"])
@pytest.mark.parametrize("weighted,width", [(True, 4), (True, 12), (False, 12)],
                         ids=["fold", "scale-outputs", "unweighted"])
def test_loop_gradcheck_float64_every_input(act_id, weighted, width):
    """The loop's hand-written backward: x, routing weights, W1, b1, W2, b2 (D = 8, O = 6)."""
    ex = Experts(3, 8, width, ACTS[act_id][0](), True, backend="loop", d_out=6).double()
    idx = torch.tensor([[0, 2], [1, 0], [2, 2], [0, 0], [1, 0]])    # expert 1 gets 2 pairs, one token twice
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.rand(5, 2, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().normal_().requires_grad_() for p in (ex.w1, ex.b1, ex.w2, ex.b2)]

    def f(x, w, w1, b1, w2, b2):
        return looped_experts(x, w1, b1, w2, b2, idx, ex.act.key, w if weighted else None)
    assert torch.autograd.gradcheck(f, (x, w, *params))


@pytest.mark.parametrize("path", PATHS)
def test_frozen_weights_get_no_gradient_and_the_rest_is_unchanged(path):
    dtype = torch.float64 if path == "loop" else torch.float32
    ex = _experts("swiglu", path, 16, dtype)
    x, idx, w = torch.randn(9, 16, dtype=dtype, requires_grad=True), torch.randint(0, 5, (9, 2)), torch.rand(9, 2, dtype=dtype)
    ex.mix(x, idx, w).square().sum().backward()
    gx, gb = x.grad.clone(), ex.b1.grad.clone()
    x.grad = None
    ex.zero_grad(set_to_none=True)
    ex.w1.requires_grad_(False)
    ex.w2.requires_grad_(False)
    ex.mix(x, idx, w).square().sum().backward()
    assert ex.w1.grad is None and ex.w2.grad is None
    torch.testing.assert_close(x.grad, gx)
    torch.testing.assert_close(ex.b1.grad, gb)


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
    routing. The grouped path keeps the gathered tokens and more."""
    T, K, D, H, N = 64, 4, 32, 16, 8
    x, idx, w = torch.randn(T, D, requires_grad=True), torch.randint(0, N, (T, K)), torch.rand(T, K)

    def saved_bytes(backend):
        ex = Experts(N, D, H, "relu", backend=backend)
        with ref.saved_storages(exclude=[x, w, idx, *ex.parameters()]) as seen:
            ex.mix(x, idx, w) if weighted else ex(x, idx)
        return sum(seen.values())
    saved = {b: saved_bytes(b) for b in ("loop", "grouped_mm")}
    M = T * K
    assert saved["loop"] <= M * H * 4                               # h only (routing: the inputs themselves)
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


def test_auto_picks_grouped_mm_on_cuda_and_in_bf16_and_the_loop_for_fp32_cpu():
    ex = Experts(4, 16, 16)
    many = 4 * Experts.LOOP_MIN_PAIRS
    assert ex.path(torch.device("cpu"), torch.float32, many) == "loop"
    assert ex.path(torch.device("cpu"), torch.float32, 8) == "grouped_mm"
    assert ex.path(torch.device("cpu"), torch.bfloat16, many) == "grouped_mm"
    assert ex.path(torch.device("cpu"), torch.float64, many) == "loop"          # grouped_mm cannot run
    assert ex.path(torch.device("cuda"), torch.bfloat16, many) == "grouped_mm"  # never Triton unless asked
    assert ex.path(torch.device("cuda"), torch.float32, many) == "loop"
