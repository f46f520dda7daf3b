"""MoETransformer: the auxiliary loss of Eq. (5) per layer, module-owned init, preset sizes."""
from __future__ import annotations

import pytest
import torch

from competesmoe import MoE
from competesmoe.config import MoEConfig, RouterConfig
from competesmoe.model.transformer import ModelConfig, MoETransformer, preset


def tiny_lm(router: str = "competesmoe", **kw) -> MoETransformer:
    moe = MoEConfig(d_model=32, d_expert=16, n_experts=8, top_k=2, router=router,
                    router_opts=RouterConfig(n_shared=1) if router.startswith("sharede") else RouterConfig())
    torch.manual_seed(0)
    return MoETransformer(ModelConfig(vocab_size=50, n_layers=3, d_model=32, n_heads=2, max_seq_len=16, moe=moe, **kw))


@pytest.mark.parametrize("compete", [False, True])
def test_aux_loss_is_the_sum_of_the_layers(compete):
    model = tiny_lm().train()
    ids = torch.randint(0, 50, (2, 12))
    out = model(ids, ids, compete=compete)
    per_layer = [o.aux_loss for o in out.moe]
    assert len(per_layer) == 3 and all(float(a.detach()) > 0 for a in per_layer)
    torch.testing.assert_close(out.aux_loss, per_layer[0] + per_layer[1] + per_layer[2])
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    if compete:  # each layer carries its own γ·L_D + β·L_div, undivided
        assert all(o.competed and o.stats["distill"] > 0 for o in out.moe)


def test_aux_reduction_mean_is_an_option():
    model = tiny_lm(aux_reduction="mean").train()
    ids = torch.randint(0, 50, (2, 12))
    out = model(ids, ids, compete=False)
    torch.testing.assert_close(out.aux_loss, sum(o.aux_loss for o in out.moe) / 3)
    with pytest.raises(ValueError, match="aux_reduction"):
        tiny_lm(aux_reduction="max")


def test_router_gets_the_full_distillation_weight_per_layer():
    """The gradient reaching one layer's router from the aux loss does not shrink with the layer count."""
    moe = MoEConfig(d_model=32, d_expert=16, n_experts=8, top_k=2, router="competesmoe")
    models = [MoETransformer(ModelConfig(vocab_size=50, n_layers=n, d_model=32, n_heads=2, max_seq_len=16,
                                         moe=moe)).train() for n in (1, 4)]
    models[0].load_state_dict(models[1].state_dict(), strict=False)   # same embedding and first block
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    grads = []
    for model in models:
        model(ids, ids, compete=True).aux_loss.backward()
        grads.append(model.blocks[0].moe.router.gate.weight.grad)
    # On a competition step no later layer's loss reaches this router; with the mean it would get 1/4.
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-9)
    assert grads[0].norm() > 0


ROUTER_PARAMS = {"smoe": ["gate.weight"], "xmoe": ["proj.weight", "expert_emb"], "pcosine": ["proj.weight", "expert_emb"],
                 "moeut": ["gate.weight"], "sharede_v3": ["gate.weight"], "competesmoe": ["gate.weight"]}


@pytest.mark.parametrize("router", sorted(ROUTER_PARAMS))
def test_routers_start_from_their_own_init_inside_the_lm(router):
    """The model's init leaves the router's parameters as the router made them, so a baseline is the same
    router inside the LM as on its own (XMoE's expert embeddings keep row norms ~0.7, not ~0.06)."""
    cfg = MoEConfig(d_model=64, d_expert=16, n_experts=16, top_k=4, router=router,
                    router_opts=RouterConfig(n_shared=1) if router.startswith("sharede") else RouterConfig())
    torch.manual_seed(3)
    standalone = MoE(cfg).router
    torch.manual_seed(3)
    model = MoETransformer(ModelConfig(vocab_size=50, n_layers=2, d_model=64, n_heads=2, max_seq_len=16, moe=cfg))
    in_lm = model.blocks[0].moe.router
    before = {k: v.clone() for k, v in in_lm.state_dict().items()}
    model.reset_parameters()
    for name in ROUTER_PARAMS[router]:
        assert torch.equal(in_lm.state_dict()[name], before[name]), f"model init overwrote {name}"
        a, b = standalone.state_dict()[name], in_lm.state_dict()[name]
        torch.testing.assert_close(a.std(), b.std(), rtol=0.15, atol=0)        # same distribution
        torch.testing.assert_close(a.norm(dim=-1).mean(), b.norm(dim=-1).mean(), rtol=0.1, atol=0)
    if "expert_emb" in ROUTER_PARAMS[router]:
        norms = in_lm.expert_emb.norm(dim=-1)
        assert 0.6 < float(norms.detach().mean()) < 0.8, norms


def test_model_init_by_module_type():
    model = tiny_lm("sharede_v2")
    res_std = 0.02 / (2 * 3) ** 0.5
    blk = model.blocks[0]
    for w, std in ((model.embed.weight, 0.02), (blk.attn.qkv.weight, 0.02), (blk.attn.out.weight, res_std),
                   (blk.moe.experts.w1, 0.02), (blk.moe.experts.w2, res_std), (blk.moe.shared.inner.w2, res_std)):
        torch.testing.assert_close(w.std().item(), std, rtol=0.12, atol=0)
        assert abs(w.mean().item()) < 0.2 * std
    assert torch.equal(blk.ln1.weight, torch.ones(32))


def test_moeut_init_follows_the_moeut_reference():
    """init=moeut (Appendix I.2 -> MoEUT's reset_parameters): stds computed here from L, d_model, heads,
    N·d_expert; router rows of equal norm with the overall std kept; untied head = nn.Linear default."""
    import math
    from competesmoe.config import apply_overrides
    model = tiny_lm("smoe", init="moeut", tie_embeddings=False)
    cfg = model.cfg
    L, d = cfg.n_layers, cfg.d_model
    s = math.sqrt(2 / L)
    blk = model.blocks[1]
    n, h = cfg.moe.n_experts, cfg.moe.d_expert
    for w, std in ((model.embed.weight, 1 / math.sqrt(d)), (blk.attn.qkv.weight, s / math.sqrt(d)),
                   (blk.attn.out.weight, s / math.sqrt(cfg.n_heads * cfg.head_dim)),
                   (blk.moe.experts.w1, s / math.sqrt(d)), (blk.moe.experts.w2, s / math.sqrt(n * h)),
                   (blk.moe.router.gate.weight, s / math.sqrt(d))):
        torch.testing.assert_close(w.std().item(), std, rtol=0.12, atol=0)
    norms = blk.moe.router.gate.weight.detach().norm(dim=1)
    torch.testing.assert_close(norms, norms.new_full(norms.shape, float(norms[0])), rtol=1e-5, atol=0)
    bound = 1 / math.sqrt(d)                                  # nn.Linear default: U(-1/sqrt(d), 1/sqrt(d))
    assert model.head.weight.abs().max() <= bound and model.head.weight.std() > 0.5 * bound / math.sqrt(3)
    gpt2 = MoETransformer(tiny_lm("smoe").cfg)
    assert gpt2.cfg.init == "gpt2" and abs(gpt2.embed.weight.std().item() - 0.02) < 0.003
    with pytest.raises(Exception):
        apply_overrides(tiny_lm("smoe").cfg, {"init": "xavier"})


def test_paper_preset_has_the_papers_parameter_count():
    """Table 12: 151 M parameters (MoEUT's 8k vocabulary, tied embeddings)."""
    cfg = preset("paper-151m")
    with torch.device("meta"):
        model = MoETransformer(cfg)
    total, active = model.num_parameters(), model.num_parameters(active=True)
    assert abs(total / 151e6 - 1) < 0.01, total
    # active: everything but the 56 inactive experts of each of the 16 layers
    per_expert = 2 * 512 * 128
    assert active == total - 16 * (64 - 8) * per_expert
    # counted by hand: embeddings, per layer attention + 2 LayerNorms + router + experts, final LayerNorm
    inner = 4 * 82
    per_layer = 512 * 3 * inner + inner * 512 + 2 * 2 * 512 + 512 * 64 + 64 * per_expert
    assert total == 8000 * 512 + 16 * per_layer + 2 * 512
