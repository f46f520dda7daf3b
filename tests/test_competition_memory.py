"""Memory of a competition step: it may keep little more for backward than a normal step.

Measured as the bytes of the distinct storages autograd saves for backward (saved_tensors_hooks),
parameters excluded: deterministic on any machine, unlike a resident-memory probe.
"""
from __future__ import annotations

import pytest
import torch

from competesmoe import MoE, MoEConfig
from competesmoe.moe import competition as comp
from competesmoe.moe.kernels import plan as plan_mod
from competesmoe.moe.rowwise import rowwise
from competesmoe.moe.experts import Experts

import reference as ref


def saved_bytes(module: torch.nn.Module, step) -> int:
    with ref.saved_storages(exclude=module.parameters()) as storages:
        loss = step()
    loss.backward()
    return sum(storages.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kappa", ["softplus", "norm"])
def test_competition_step_saves_at_most_1p2x_a_normal_step(dtype, kappa):
    cfg = MoEConfig(d_model=64, d_expert=32, n_experts=16, top_k=4, router="competesmoe", activation="relu")
    cfg.competition.kappa = kappa
    moe = MoE(cfg).train()
    x = torch.randn(1024, 64)

    def step(compete: bool):
        def run():
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                out = moe(x.requires_grad_(), compete=compete)
                return out.y.float().square().mean() + out.aux_loss
        return run

    normal = saved_bytes(moe, step(False))
    compete = saved_bytes(moe, step(True))
    assert compete <= 1.2 * normal, f"competition step saves {compete / normal:.2f}x a normal step ({compete} vs {normal} B)"


@pytest.mark.parametrize("chunk", [None, 50], ids=["one-chunk", "six-uneven-chunks"])
@pytest.mark.parametrize("kappa", ["softplus", "softmax"])
def test_recomputing_the_winners_changes_no_value_or_gradient_and_saves_their_outputs(kappa, chunk, monkeypatch):
    cfg = MoEConfig(d_model=32, d_expert=16, n_experts=8, top_k=2, router="competesmoe", activation="gelu")
    cfg.competition.kappa = kappa
    moe = MoE(cfg).train()
    if chunk:
        monkeypatch.setattr(moe, "_winners_chunk", lambda x: chunk)
    x = torch.randn(256, 32)
    results, saved = {}, {}
    for recompute in (True, False):
        moe.cfg.competition.recompute_winners = recompute
        xi = x.clone().requires_grad_()

        def run():
            out = moe(xi, compete=True)
            results[recompute] = [out.y.detach(), out.aux_loss.detach(), out.weights.detach()]
            return out.y.square().mean() + out.aux_loss
        moe.zero_grad()
        saved[recompute] = saved_bytes(moe, run)
        results[recompute] += [xi.grad] + [p.grad.clone() for p in moe.parameters()]
    # One chunk: the same operations, bit for bit. Chunks: GEMMs over other row sets and L_div summed per
    # chunk, so float32 rounding differs (observed: 1.2e-7 absolute at most, values of order 1); the
    # tolerance says "the same up to float32 rounding".
    tol = dict(rtol=0, atol=0) if chunk is None else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(results[True], results[False]):
        torch.testing.assert_close(a, b, **tol)
    T, K, D = 256, 2, 32
    assert saved[False] - saved[True] >= T * K * D * 4          # the winners' outputs [T, K, D] are not kept


# --- the block-wise evaluation changes nothing ---------------------------------------------------------
def _naive_affinity(out_TKD, kappa, lse_TD=None):
    """Per row, in float64: mean_d κ(o_d), or ‖o‖₂, or mean_d exp(o_d − lse_d)."""
    T, K, D = out_TKD.shape
    rows = []
    for t in range(T):
        for k in range(K):
            o = out_TKD[t, k].double()
            if kappa == "norm":
                rows.append(o.pow(2).sum().sqrt())
            elif kappa == "softmax":
                rows.append(torch.exp(o - lse_TD[t].double()).mean())
            else:
                rows.append(ref.kappa(kappa, o).mean())
    return torch.stack(rows).view(T, K)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kappa", ["softplus", "silu", "sigmoid", "relu", "norm", "softmax"])
def test_blockwise_affinity_matches_naive_values_and_gradients(monkeypatch, dtype, kappa):
    monkeypatch.setitem(plan_mod._BLOCK_ELEMENTS, "cpu", 2 * 3 * 5)    # blocks of 2 tokens (K 3, D 5), 11 tokens
    out = torch.randn(11, 3, 5).to(dtype).requires_grad_()
    lse = torch.randn(11, 1, 5) if kappa == "softmax" else None
    g = torch.randn(11, 3)
    a = comp.affinity(out, kappa, lse)
    (a * g).sum().backward()
    # Reference in float64 from the same (rounded) inputs; its gradient cast back to the input's dtype.
    o64 = out.detach().double().requires_grad_()
    a_ref = _naive_affinity(o64, kappa, None if lse is None else lse[:, 0])
    (a_ref * g.double()).sum().backward()
    assert a.dtype == torch.float32
    torch.testing.assert_close(a.double(), a_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.grad.double(), o64.grad.to(dtype).double(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blockwise_diversity_matches_naive_values_and_gradients(monkeypatch, dtype):
    monkeypatch.setitem(plan_mod._BLOCK_ELEMENTS, "cpu", 3 * 4 * 6)    # blocks of 3 tokens, 10 tokens
    out = torch.randn(10, 4, 6)
    out[4, 2] = 0.0                                                 # a zero output: similarity 0
    out = out.to(dtype).requires_grad_()
    comp.diversity_loss(out).backward()

    o64 = out.detach().double().requires_grad_()
    T, K, _ = o64.shape
    total = 0
    for t in range(T):
        for i in range(K):
            for j in range(K):
                a, b = o64[t, i], o64[t, j]
                if i != j and a.norm() > 0 and b.norm() > 0:
                    total = total + a @ b / (a.norm() * b.norm())
    ref_loss = total / (K * (K - 1)) / T
    ref_loss.backward()
    assert comp.diversity_loss(out).item() == pytest.approx(ref_loss.item(), rel=1e-5)
    # The zero output is not differentiable: its gradient follows F.normalize's convention (1/eps scale),
    # compared below against one unblocked evaluation instead of the reference.
    keep = torch.ones(10, 4, 1, dtype=torch.bool)
    keep[4, 2] = False
    torch.testing.assert_close(out.grad.double() * keep, o64.grad.to(dtype).double() * keep,
                               rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)
    monkeypatch.setitem(plan_mod._BLOCK_ELEMENTS, "cpu", 1 << 20)
    whole = out.detach().requires_grad_()
    comp.diversity_loss(whole).backward()
    torch.testing.assert_close(out.grad, whole.grad, rtol=0, atol=0)


def test_blockwise_gradcheck_float64(monkeypatch):
    monkeypatch.setitem(plan_mod._BLOCK_ELEMENTS, "cpu", 2 * 3 * 4)
    out = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda o: comp.affinity(o, "softplus"), (out,))
    assert torch.autograd.gradcheck(comp.diversity_loss, (out,))


def test_rowwise_refuses_constants_that_need_a_gradient():
    with pytest.raises(ValueError, match="must not require a gradient"):
        comp.affinity(torch.randn(3, 4), "softmax", torch.randn(3, 4, requires_grad=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kappa", ["softplus", "relu", "norm", "softmax"])
def test_winners_outputs_equal_the_separate_functions(monkeypatch, dtype, kappa):
    """One block-wise pass = Experts.combine(out, winner_weights(affinity(out))) and diversity_loss(out)."""
    monkeypatch.setitem(plan_mod._BLOCK_ELEMENTS, "cpu", 2 * 3 * 5)    # blocks of 2 tokens
    out = torch.randn(9, 3, 5).to(dtype)
    lse = torch.randn(9, 5) if kappa == "softmax" else None
    g_y, g_s = torch.randn(9, 5), torch.randn(9, 3)

    def grads(fused: bool):
        o = out.clone().requires_grad_()
        if fused:
            y, s, div = comp.winners_outputs(o, kappa, 1e-6, lse)
        else:
            s = comp.winner_weights(comp.affinity(o, kappa, None if lse is None else lse[:, None, :]), 1e-6)
            y, div = Experts.combine(o, s), comp.diversity_loss(o)
        ((y.float() * g_y).sum() + (s * g_s).sum() + 3 * div).backward()
        return y, s, div, o.grad

    for got, want in zip(grads(True), grads(False)):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-6)


def test_rowwise_backward_called_under_autocast_recomputes_as_forward_did():
    """Forward runs fn with autocast off (explicit float32); a backward called inside an autocast region
    (a common training loop) must recompute the same way, not in bf16."""
    w = torch.randn(16, 16)

    def fn(x):
        return (x @ w).square().sum(-1)

    grads = []
    for inside in (False, True):
        x = torch.randn(40, 16, generator=torch.Generator().manual_seed(0)).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = rowwise(fn, x, block_elements=64)
            if inside:
                y.sum().backward()
        if not inside:
            y.sum().backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(grads[0], 2 * (x @ w) @ w.T)                 # d/dx Σ (xW)² in float32
