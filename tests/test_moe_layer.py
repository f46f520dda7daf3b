"""The MoE layer against the naive references in tests/reference.py."""
import itertools

import math

import pytest
import torch

import reference as ref
from torch.func import functional_call
from competesmoe import MoE, MoEConfig, CompetitionSchedule, attach_schedule, on_optimizer_step
from competesmoe.config import ROUTERS, KAPPAS, CompetitionConfig, RouterConfig, LossConfig, ConfigError
from competesmoe.moe import competition as comp
from competesmoe.moe.experts import Experts
from competesmoe.moe.losses import entropy_loss, switch_loss, z_loss


def _randomize(module: torch.nn.Module, scale: float = 0.5) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, scale)


# --- experts ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation,bias,backend,shape", [
    (a, b, be, s) for a, b, be, s in itertools.product(
        ["relu", "gelu", "silu", "swiglu"], [False, True], ["grouped_mm", "loop"],
        [(13, 8, 16, 8, 3), (7, 4, 32, 4, 1), (20, 6, 8, 12, 6)])])
def test_sparse_experts_match_naive_loop_outputs_and_grads(activation, bias, backend, shape):
    T, N, D, H, K = shape
    E = Experts(N, D, H, activation, bias, backend)
    _randomize(E, 0.3)
    x = torch.randn(T, D, requires_grad=True)
    idx = torch.stack([torch.randperm(N)[:K] for _ in range(T)])
    w = torch.rand(T, K, requires_grad=True)
    y = Experts.combine(E(x, idx), w)
    y_ref = ref.sparse_moe(E, x, idx, w)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    params = [x, w] + list(E.parameters())
    grads = torch.autograd.grad((y * g).sum(), params)
    grads_ref = torch.autograd.grad((y_ref * g).sum(), params)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_each_backend_really_runs_its_path(monkeypatch):
    """grouped_mm calls it twice (one per weight); the loop never does; auto on CPU takes the loop from
    LOOP_MIN_PAIRS pairs per expert on average, grouped_mm below."""
    calls = []
    import torch.nn.functional as F
    real = F.grouped_mm
    monkeypatch.setattr(F, "grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    E = Experts(4, 16, 8, "gelu", backend="grouped_mm")
    few = (torch.randn(5, 16), torch.randint(0, 4, (5, 2)))
    many = (torch.randn(512, 16), torch.randint(0, 4, (512, 2)))   # 1024 pairs = 256 per expert
    E(*few)
    assert len(calls) == 2
    E.backend = "loop"
    E(*few)
    assert len(calls) == 2
    E.backend = "auto"
    E(*many)
    assert len(calls) == 2
    E(*few)
    assert len(calls) == 4


def test_auto_backend_resolution(monkeypatch):
    import competesmoe.moe.experts as experts_mod
    E = Experts(4, 16, 8, "gelu")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    many = E.LOOP_MIN_PAIRS * 4
    for dtype in (torch.float32, torch.float64):
        assert E.path(cpu, dtype) == E.path(cpu, dtype, many) == "loop"
    assert E.path(cpu, torch.bfloat16) == E.path(cpu, torch.bfloat16, many) == "grouped_mm"   # loop not faster in bf16
    assert E.path(cpu, torch.float32, many - 1) == E.path(cpu, torch.bfloat16, 8) == "grouped_mm"
    assert E.path(cpu, torch.float64, 8) == "loop"                    # grouped_mm takes fp32/bf16 only
    # CUDA: grouped_mm (measured on GPUs); Triton only when asked for, until measured there
    assert E.path(cuda, torch.bfloat16) == E.path(cuda, torch.bfloat16, many) == "grouped_mm"
    assert E.path(cuda, torch.float32) == "loop"                   # CUDA's grouped_mm takes bf16 only
    E.backend = "triton"
    if experts_mod.triton_moe is not None:
        assert E.path(cuda, torch.bfloat16) == E.path(cuda, torch.float32, 8) == "triton"
    monkeypatch.setattr(experts_mod, "triton_moe", None)          # CUDA without Triton
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        E.path(cuda, torch.bfloat16)
    E.backend = "grouped_mm"
    assert E.path(cpu, torch.float32, many) == "grouped_mm"
    with pytest.raises(RuntimeError, match="16-byte"):
        E.path(cpu, torch.float64)
    E.backend = "auto"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)   # grouped_mm's meta kernel: bf16 only
    assert E.path(cpu, torch.float32, 8) == "loop"
    assert E.path(cpu, torch.bfloat16, 8) == "grouped_mm"


def test_few_pairs_compile_in_float32_on_cpu():
    """torch.compile traces grouped_mm with its bf16-only meta kernel: auto must not pick it for fp32."""
    E = Experts(4, 16, 16, "gelu")
    x, idx, w = torch.randn(6, 16, requires_grad=True), torch.randint(0, 4, (6, 2)), torch.rand(6, 2)
    want = E.mix(x, idx, w)
    got = torch.compile(E.mix, backend="aot_eager", fullgraph=False)(x, idx, w)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert x.grad is not None


def test_grouped_mm_refuses_misaligned_sizes_clearly(monkeypatch):
    E = Experts(4, 6, 5, "gelu", backend="grouped_mm")  # 5 floats = 20 bytes: not a 16-byte stride
    _randomize(E, 0.3)
    x, idx, w = torch.randn(3, 6), torch.randint(0, 4, (3, 2)), torch.rand(3, 2)
    with pytest.raises(RuntimeError, match="16-byte"):
        E(x, idx)
    calls = []
    import torch.nn.functional as F
    real = F.grouped_mm
    monkeypatch.setattr(F, "grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    E.backend = "auto"  # falls back to the loop: no grouped_mm call, the reference's result
    torch.testing.assert_close(Experts.combine(E(x, idx), w), ref.sparse_moe(E, x, idx, w), rtol=1e-5, atol=1e-5)
    assert calls == []


def test_experts_gradcheck_float64():
    E = Experts(3, 4, 4, "gelu", bias=True).double()
    idx = torch.tensor([[0, 2], [1, 2], [2, 0]])
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, 2, dtype=torch.float64, requires_grad=True)
    names = ["w1", "w2", "b1", "b2"]
    params = tuple(getattr(E, n).detach().clone().normal_().requires_grad_() for n in names)

    def fn(x, w, *p):
        return Experts.combine(functional_call(E, dict(zip(names, p)), (x, idx)), w)

    assert torch.autograd.gradcheck(fn, (x, w, *params))


def test_forward_all_matches_per_token():
    E = Experts(5, 8, 4, "swiglu", bias=True)
    _randomize(E, 0.3)
    x = torch.randn(6, 8)
    out = E.forward_all(x)
    for e in range(5):
        for t in range(6):
            torch.testing.assert_close(out[e, t], ref.expert_out(E, e, x[t]), rtol=1e-5, atol=1e-6)


# --- routers ---------------------------------------------------------------------------------------
ROUTER_OPTS = {
    "smoe": RouterConfig(), "competesmoe": RouterConfig(), "xmoe": RouterConfig(temperature=0.5),
    "pcosine": RouterConfig(cosine_eps=0.3, proj_dim=3), "moeut": RouterConfig(),
    "moeut_norm": RouterConfig(normalize=True), "sharede_v2": RouterConfig(n_shared=2),
    "sharede_v3": RouterConfig(routed_scale=2.0), "sharede_v3_bias": RouterConfig(bias_balance=True),
}


@pytest.mark.parametrize("name", list(ROUTER_OPTS))
def test_router_weights_and_indices_match_reference(name):
    router = name.split("_norm")[0].replace("_bias", "")
    opts = ROUTER_OPTS[name]
    cfg = MoEConfig(d_model=12, d_expert=8, n_experts=9, top_k=4, router=router, router_bias=True, router_opts=opts)
    moe = MoE(cfg)
    _randomize(moe.router, 0.7)
    if router == "sharede_v3" and opts.bias_balance:
        moe.router.expert_bias.copy_(torch.randn(cfg.n_routed))
    x = torch.randn(17, 12)
    out = moe(x)
    logits, idx, weights = ref.router_reference(router, moe.router, x, cfg.k_routed, opts)
    torch.testing.assert_close(out.router_logits.double(), logits, rtol=1e-5, atol=1e-5)
    assert out.indices.shape == (17, cfg.k_routed)
    for t in range(17):
        assert out.indices[t].tolist() == idx[t]
        torch.testing.assert_close(out.weights[t].double(), weights[t], rtol=1e-5, atol=1e-6)


def test_moe_output_is_weighted_sum_of_chosen_experts_plus_shared():
    cfg = MoEConfig(d_model=8, d_expert=4, n_experts=6, top_k=3, router="sharede_v2",
                    router_opts=RouterConfig(n_shared=2, shared_mix=0.25))
    moe = MoE(cfg)
    x = torch.randn(2, 5, 8)
    out = moe(x)
    x_TD = x.reshape(-1, 8)
    routed = ref.sparse_moe(moe.experts, x_TD, out.indices, out.weights)
    shared = torch.stack([ref.expert_out(moe.shared.inner, 0, x_TD[t]) for t in range(10)])
    torch.testing.assert_close(out.y.reshape(-1, 8), 0.25 * shared + 0.75 * routed, rtol=1e-5, atol=1e-6)
    # Same budget: 2 shared + 4 routed experts hold as many expert parameters as 6 experts.
    n_expert_params = sum(p.numel() for n, p in moe.named_parameters() if not n.startswith("router"))
    plain = MoE(MoEConfig(d_model=8, d_expert=4, n_experts=6, top_k=3))
    assert n_expert_params == sum(p.numel() for p in plain.experts.parameters())


def test_v3_bias_balancing_moves_toward_underloaded_experts():
    cfg = MoEConfig(d_model=8, d_expert=4, n_experts=5, top_k=2, router="sharede_v3",
                    router_opts=RouterConfig(bias_balance=True, bias_rate=0.01))
    moe = MoE(cfg).train()
    with torch.no_grad():
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[0, 0] = 5.0   # expert 0 wins every token with x[0] > 0
    x = torch.randn(64, 8).abs()
    load = torch.bincount(moe(x).indices.reshape(-1), minlength=4).float()
    on_optimizer_step(moe)
    expected = 0.01 * torch.sign(load.mean() - load)
    torch.testing.assert_close(moe.router.expert_bias, expected)
    assert moe.router.expert_bias[0] < 0 and moe.router.load.sum() == 0
    bias_before = moe.router.expert_bias.clone()
    moe.eval()
    moe(x)
    on_optimizer_step(moe)                  # no training forward: no load, no update
    torch.testing.assert_close(moe.router.expert_bias, bias_before)


# --- competition -----------------------------------------------------------------------------------
def _competesmoe(kappa="softplus", **cc):
    cfg = MoEConfig(d_model=8, d_expert=8, n_experts=6, top_k=2, router="competesmoe", activation="gelu",
                    competition=CompetitionConfig(kappa=kappa, **cc), losses=LossConfig(balance="none"))
    moe = MoE(cfg).train()
    _randomize(moe.experts, 0.5)
    return moe


@pytest.mark.parametrize("kappa", KAPPAS)
def test_competition_winners_weights_and_output_match_reference(kappa):
    moe = _competesmoe(kappa, chunk_tokens=3)
    x = torch.randn(11, 8)
    out = moe(x, compete=True)
    winners, weights, y_ref, _ = ref.competition_reference(moe.experts, x, 2, kappa, moe.cfg.competition.eps)
    assert out.competed
    for t in range(11):
        assert out.indices[t].tolist() == winners[t]
        torch.testing.assert_close(out.weights[t].double(), weights[t], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.y.double(), y_ref, rtol=1e-5, atol=1e-5)
    win, s = moe.competition_winners(x)   # analysis mode gives the same
    assert win.tolist() == winners


def test_winner_weights_clamp_nonpositive_affinities():
    a = torch.tensor([[2.0, 1.0], [-1.0, 3.0], [-2.0, -5.0]])
    s = comp.winner_weights(a, eps=1e-6)
    torch.testing.assert_close(s[0], torch.tensor([2 / 3, 1 / 3]))
    torch.testing.assert_close(s[1], torch.tensor([1e-6 / (3 + 1e-6), 3 / (3 + 1e-6)]))
    torch.testing.assert_close(s[2], torch.tensor([0.5, 0.5]))  # none positive: uniform
    assert torch.isfinite(s).all()


def test_softmax_kappa_is_taken_across_experts_and_ranks_them():
    """kappa='softmax': a_i = mean_d softmax over experts of g(x)_d (a softmax over the output dimension
    alone would give every expert the mean 1/D and could not rank them)."""
    moe = _competesmoe("softmax")
    x = torch.randn(7, 8)
    a_TN, lse_TD = comp.all_affinities(moe.experts, x, "softmax", chunk_tokens=3)
    _, _, _, a_ref = ref.competition_reference(moe.experts, x, 2, "softmax", moe.cfg.competition.eps)
    torch.testing.assert_close(a_TN.double(), a_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a_TN.sum(-1), torch.ones(7))          # a distribution over the N experts
    assert (a_TN.max(-1).values - a_TN.min(-1).values > 1e-3).all()   # that tells experts apart
    # the sparse path (winners recomputed with gradients) gives the same affinities from the saved lse
    win_TK = a_TN.topk(2, dim=-1).indices
    out_TKD = moe.experts(x, win_TK)
    torch.testing.assert_close(comp.affinity(out_TKD, "softmax", lse_TD[:, None, :]), a_TN.gather(-1, win_TK))


def test_distillation_and_diversity_match_reference():
    T, N, K, D = 9, 6, 3, 5
    logits = torch.randn(T, N)
    winners = torch.stack([torch.randperm(N)[:K] for _ in range(T)])
    s = torch.rand(T, K)
    s = s / s.sum(-1, keepdim=True)
    target = torch.zeros(T, N).scatter(-1, winners, s)
    got = comp.distillation_loss(logits, target, winners, alpha=0.7)
    assert got.item() == pytest.approx(ref.distill_reference(logits, target, winners.tolist(), 0.7, K), rel=1e-5)
    out = torch.randn(T, K, D)
    assert comp.diversity_loss(out).item() == pytest.approx(ref.diversity_reference(out), rel=1e-5)
    assert comp.diversity_loss(out[:, :1]).item() == 0.0
    assert torch.autograd.gradcheck(comp.diversity_loss, out.double().requires_grad_())
    out[2, 1] = 0.0  # an expert output of exactly zero (not differentiable there: no gradcheck)
    assert comp.diversity_loss(out).item() == pytest.approx(ref.diversity_reference(out), rel=1e-5)


@pytest.mark.parametrize("distill", ["paper", "reference"])
def test_competition_aux_loss_is_gamma_distill_plus_beta_diversity(distill):
    moe = _competesmoe(distill=distill, gamma=0.3, beta=0.2, alpha=0.5)
    x = torch.randn(10, 8)
    out = moe(x, compete=True)
    winners, weights, _, affs = ref.competition_reference(moe.experts, x, 2, "softplus", 1e-6)
    if distill == "paper":
        target = torch.zeros(10, 6, dtype=torch.float64)
        for t in range(10):
            target[t, winners[t]] = weights[t]
    else:
        target = torch.stack([ref.softmax(a) for a in affs])
    l_d = ref.distill_reference(out.router_logits, target, winners, 0.5, 2)
    outs = torch.stack([torch.stack([ref.expert_out(moe.experts, e, x[t]) for e in winners[t]]) for t in range(10)])
    l_div = ref.diversity_reference(outs)
    assert out.aux_loss.item() == pytest.approx(0.3 * l_d + 0.2 * l_div, rel=1e-4)
    assert out.stats["distill"].item() == pytest.approx(l_d, rel=1e-4)


def test_distill_target_topk_uses_the_routers_sparse_policy():
    """distill_target=topk: Eq. (2) with s_R = softmax(TopK_{-inf}(h)) (Section 2.1): the router's top-K
    softmax weights at its top-K, 0 elsewhere; only the router's top-K logits get a gradient."""
    moe = _competesmoe(distill_target="topk", gamma=1.0, beta=0.0, alpha=0.5)
    x = torch.randn(10, 8)
    out = moe(x, compete=True)
    winners, weights, _, _ = ref.competition_reference(moe.experts, x, 2, "softplus", 1e-6)
    h = out.router_logits.detach().double()
    total = 0.0
    for t in range(10):
        top = sorted(range(6), key=lambda i: -float(h[t, i]))[:2]
        z = [math.exp(float(h[t, i])) for i in top]
        s_r = [0.0] * 6
        for i, zi in zip(top, z):
            s_r[i] = zi / sum(z)
        s_c = [0.0] * 6
        for j, w in zip(winners[t], weights[t]):
            s_c[j] = float(w.detach())
        total += sum((a - b) ** 2 for a, b in zip(s_r, s_c)) / 6 + 0.5 / 2 * sum((s_c[j] - s_r[j]) ** 2
                                                                               for j in winners[t])
    assert out.stats["distill"].item() == pytest.approx(total / 10, rel=1e-4)
    g = torch.autograd.grad(out.aux_loss, out.router_logits, retain_graph=True)[0]
    top_mask = torch.zeros(10, 6, dtype=torch.bool).scatter(-1, out.router_logits.topk(2, -1).indices, True)
    assert (g[~top_mask] == 0).all() and (g[top_mask] != 0).any()
    dense = _competesmoe(gamma=1.0, beta=0.0, alpha=0.5)           # default: dense softmax over all N
    dense.load_state_dict(moe.state_dict())
    out_d = dense(x, compete=True)
    assert out_d.stats["distill"].item() != pytest.approx(out.stats["distill"].item(), rel=1e-3)


def test_router_diversity_adds_beta_diversity_of_the_routers_top_k_every_step():
    """Table 7's "diversity loss without competition": β·L_div on the router's own top-K outputs
    (`router_diversity_steps="all"`: every training step)."""
    cfg = MoEConfig(d_model=8, d_expert=4, n_experts=6, top_k=3, router="smoe", losses=LossConfig(balance="none"),
                    competition=CompetitionConfig(router_diversity=True, router_diversity_steps="all", beta=0.2))
    moe = MoE(cfg).train()
    _randomize(moe)
    x = torch.randn(10, 8)
    out = moe(x)
    assert not out.competed
    _, idx, _ = ref.router_reference("smoe", moe.router, x, 3, cfg.router_opts)
    outs = torch.stack([torch.stack([ref.expert_out(moe.experts, e, x[t]) for e in idx[t]]) for t in range(10)])
    assert out.aux_loss.item() == pytest.approx(0.2 * ref.diversity_reference(outs), rel=1e-4)
    g_w1 = torch.autograd.grad(out.aux_loss, moe.experts.w1)[0]
    chosen = set(int(e) for row in idx for e in row)
    assert all((g_w1[e].abs().sum() > 0) == (e in chosen) for e in range(6))   # it reaches the chosen experts
    assert moe.eval()(x).aux_loss.item() == 0.0                                  # training only
    plain = MoE(cfg.replace(competition=CompetitionConfig(beta=0.2))).train()
    assert plain(x).aux_loss.item() == 0.0                                        # off by default


def test_router_diversity_by_default_only_on_the_schedules_steps():
    """The default dose: L_div only where the competition schedule fires for this layer (ω of the steps
    after warm-up); without a schedule (a layer on its own) never."""
    from competesmoe.moe import CompetitionSchedule
    from competesmoe.moe.layer import attach_schedule, on_optimizer_step
    cfg = MoEConfig(d_model=8, d_expert=4, n_experts=6, top_k=3, router="smoe", losses=LossConfig(balance="none"),
                    competition=CompetitionConfig(router_diversity=True, beta=0.2))
    moe = MoE(cfg).train()
    _randomize(moe)
    x = torch.randn(10, 8)
    assert moe(x).aux_loss.item() == 0.0 and "diversity" not in moe(x).stats      # no schedule attached
    sched = CompetitionSchedule(1, 40, omega=0.3, a_max=1, warmup=0.25, seed=3)
    attach_schedule(moe, sched)
    fired = []
    for step in range(40):
        out = moe(x)
        fired.append("diversity" in out.stats)
        assert (out.aux_loss.item() != 0) == fired[-1]
        on_optimizer_step(moe)
    assert fired == [bool(sched.table[0, t]) for t in range(40)]
    assert not any(fired[:10]) and 0 < sum(fired) < 40                               # none in the warm-up


def test_losers_and_router_get_no_task_gradient_on_competition_step():
    moe = _competesmoe()
    x = torch.randn(4, 8)
    out = moe(x, compete=True)
    task = out.y.square().sum()
    g_w1, g_w2, g_router = torch.autograd.grad(task, [moe.experts.w1, moe.experts.w2, moe.router.gate.weight],
                                               allow_unused=True, materialize_grads=True)
    winners = set(out.indices.reshape(-1).tolist())
    for e in range(6):
        has_grad = g_w1[e].abs().sum() > 0 and g_w2[e].abs().sum() > 0
        assert has_grad == (e in winners), e
    assert g_router.abs().sum() == 0          # the router learns only from L_D (and balance) here
    g_aux = torch.autograd.grad(out.aux_loss, moe.router.gate.weight)[0]
    assert g_aux.abs().sum() > 0


def test_competition_gradcheck_float64_through_outputs_and_weights():
    moe = _competesmoe().double()
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    win = moe(x, compete=True).indices  # fixed winners: gradcheck perturbations must not flip them

    def fn(x, w1, w2):
        out = functional_call(moe.experts, {"w1": w1, "w2": w2}, (x, win))
        s = comp.winner_weights(comp.affinity(out, "softplus"), 1e-6)
        return Experts.combine(out, s)

    assert torch.autograd.gradcheck(fn, (x, moe.experts.w1.detach().clone().requires_grad_(),
                                         moe.experts.w2.detach().clone().requires_grad_()))
    # ... and the layer's competition output is exactly this function.
    torch.testing.assert_close(moe(x, compete=True).y, fn(x, moe.experts.w1, moe.experts.w2))


def test_competition_forward_false_uses_router_but_still_distils():
    moe = _competesmoe(competition_forward=False)
    x = torch.randn(7, 8)
    out = moe(x, compete=True)
    normal = moe(x, compete=False)
    torch.testing.assert_close(out.y, normal.y)
    assert torch.equal(out.indices, normal.indices)
    assert out.stats["distill"] > 0 and out.aux_loss > 0


@pytest.mark.parametrize("detach", [False, True])
def test_detach_router_off_competition(detach):
    moe = _competesmoe(detach_router_off_competition=detach)
    out = moe(torch.randn(5, 8), compete=False)
    g = torch.autograd.grad(out.y.sum(), moe.router.gate.weight, materialize_grads=True)[0]
    assert (g.abs().sum() == 0) == detach
    sched = CompetitionSchedule(1, 100, omega=0.0, warmup=0.5)
    attach_schedule(moe, sched)               # during warm-up the router keeps its task gradient
    out = moe(torch.randn(5, 8))
    g = torch.autograd.grad(out.y.sum(), moe.router.gate.weight, materialize_grads=True)[0]
    assert g.abs().sum() > 0


def test_chunking_does_not_change_competition():
    moe = _competesmoe()
    x = torch.randn(23, 8)
    outs = []
    for chunk in (1, 5, 1000):
        moe.cfg.competition.chunk_tokens = chunk
        outs.append(moe(x, compete=True))
    for o in outs[1:]:
        assert torch.equal(o.indices, outs[0].indices)
        torch.testing.assert_close(o.y, outs[0].y)


def test_eval_never_competes_and_schedule_drives_training():
    moe = _competesmoe()
    sched = CompetitionSchedule(1, 10, omega=1.0, a_max=1)
    attach_schedule(moe, sched)
    x = torch.randn(4, 8)
    assert moe(x).competed
    moe.eval()
    assert not moe(x).competed and not moe(x, compete=True).competed
    moe.train()
    for _ in range(10):
        on_optimizer_step(moe)
    assert sched.step == 10 and not moe(x).competed   # past the planned steps: no competition, no crash


def test_compete_on_other_router_is_an_error():
    moe = MoE(MoEConfig(8, 4, 4, 2, router="smoe")).train()
    with pytest.raises(ValueError, match="competesmoe"):
        moe(torch.randn(3, 8), compete=True)


def test_wrong_input_width_is_a_clear_error():
    moe = MoE(MoEConfig(8, 4, 4, 2))
    with pytest.raises(ValueError, match="d_model=8"):
        moe(torch.randn(3, 7))


@pytest.mark.parametrize("router", ROUTERS)
def test_every_router_trains_under_bf16_autocast(router):
    moe = MoE(MoEConfig(16, 16, 8, 3, router=router)).train()
    x = torch.randn(2, 6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe(x, compete=True if router == "competesmoe" else None)
        loss = out.y.float().square().mean() + out.aux_loss
    loss.backward()
    assert out.y.dtype == torch.bfloat16 and out.y.shape == x.shape
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in moe.experts.parameters())
    ref_y = moe(x, compete=True if router == "competesmoe" else None).y
    assert (out.y.float() - ref_y).abs().max() < 0.1


# --- balance losses --------------------------------------------------------------------------------
def test_balance_losses_match_reference():
    logits = torch.randn(12, 5)
    idx = torch.stack([torch.randperm(5)[:2] for _ in range(12)])
    assert switch_loss(logits, idx).item() == pytest.approx(ref.switch_reference(logits, idx.tolist()), rel=1e-5)
    assert entropy_loss(logits.view(3, 4, 5)).item() == pytest.approx(ref.entropy_reference(logits.view(3, 4, 5)), rel=1e-5)
    assert z_loss(logits).item() == pytest.approx(ref.zloss_reference(logits), rel=1e-5)


def test_switch_loss_is_one_at_perfect_balance_counting_all_k():
    N = 4
    logits = torch.zeros(8, N)                   # uniform router probabilities
    idx = torch.tensor([[0, 1], [2, 3]] * 4)     # every expert gets 1/N of the assignments
    assert switch_loss(logits, idx).item() == pytest.approx(1.0)
    assert entropy_loss(logits.view(2, 4, N)).item() == pytest.approx(-torch.log(torch.tensor(4.0)).item())
    skewed = torch.tensor([[0, 1]] * 8)
    assert switch_loss(logits, skewed).item() == pytest.approx(1.0)  # uniform P: any f gives 1
    peaked = torch.zeros(8, N)
    peaked[:, :2] = 3.0
    assert switch_loss(peaked, skewed).item() > 1.5


def test_layer_aux_loss_uses_configured_balance_and_zloss():
    cfg = MoEConfig(8, 4, 5, 2, losses=LossConfig(balance="entropy", balance_coef=0.1, zloss_coef=0.01))
    moe = MoE(cfg)
    x = torch.randn(3, 4, 8)
    out = moe(x)
    expected = 0.1 * ref.entropy_reference(out.router_logits.view(3, 4, 5)) + 0.01 * ref.zloss_reference(out.router_logits)
    assert out.aux_loss.item() == pytest.approx(expected, rel=1e-5)


# --- config validation -----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,msg", [
    (dict(top_k=9), "K must be <= N"),
    (dict(router="nope"), "router='nope'"),
    (dict(activation="tanh"), "activation"),
    (dict(router="sharede_v2", top_k=1), "must exceed n_shared"),
    (dict(d_model=0), "d_model"),
])
def test_config_errors_are_clear(kwargs, msg):
    base = dict(d_model=8, d_expert=4, n_experts=8, top_k=2)
    with pytest.raises(ConfigError, match=msg):
        MoEConfig(**{**base, **kwargs})


@pytest.mark.parametrize("make,msg", [
    (lambda: CompetitionConfig(kappa="exp"), "kappa='exp'"),     # exp gives NaNs in the paper: not offered
    (lambda: CompetitionConfig(alpha=-1), "alpha"),
    (lambda: CompetitionConfig(distill="x"), "distill"),
    (lambda: RouterConfig(shared_mix=1.5), "shared_mix"),
    (lambda: RouterConfig(temperature=0), "temperature"),
    (lambda: LossConfig(balance="aux"), "balance"),
])
def test_sub_config_errors_are_clear(make, msg):
    with pytest.raises(ConfigError, match=msg):
        make()
