"""Sparse upcycling: tiny random models of every supported family, no download.

Step 0 equals the dense model (or the documented c(x)·g(x)), save/load round trips, the routers' seeded
init, noise, the tie of identical experts in the competition and how training breaks it, LLaVA, our own
dense MoETransformer, and the clear errors for unsupported models.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer
from transformers.utils import logging as hf_logging

import competesmoe  # noqa: F401  (registers the model types)
from competesmoe import moe_layers
from competesmoe.config import ConfigError
from competesmoe.cli import main as cli_main
from competesmoe.model.transformer import ModelConfig, MoETransformer
from competesmoe.model.upcycle import (ROUTER_STD, UpcycleConfig, UpcycleError, UpcycledMLP, decoder_layers, is_upcycled,
                                       upcycle, upcycle_transformer)
from competesmoe.train.loading import load_dense_hf

hf_logging.set_verbosity_error()

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest)
V = 300
EXACT = ["smoe", "competesmoe", "xmoe", "pcosine", "sharede_v2", "sharede_v3"]
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def family_config(name: str):
    c = transformers
    return {
        "llama": lambda: c.LlamaConfig(**SMALL, mlp_bias=True),   # gated, with biases
        "mistral": lambda: c.MistralConfig(**SMALL),
        "qwen2": lambda: c.Qwen2Config(**SMALL),
        "qwen3": lambda: c.Qwen3Config(**SMALL, head_dim=8),
        "phi3": lambda: c.Phi3Config(**SMALL, pad_token_id=0),      # fused gate_up_proj
        "gpt2": lambda: c.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64),  # Conv1D, gelu_new
    }[name]()


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2"]


def tiny_tokenizer():
    from competesmoe.data.tokenizer import train_bpe
    from competesmoe.model.hf import hf_tokenizer
    texts = ["the cat sat on the mat", "a dog ran in the park", "hello world, this is a test"] * 20
    return hf_tokenizer(train_bpe(texts, V))


@pytest.fixture(scope="module")
def dense_folders(tmp_path_factory):
    """Each family saved with save_pretrained (and a tokenizer), as a user's local folder."""
    out = {}
    for name in FAMILIES:
        torch.manual_seed(1)
        folder = tmp_path_factory.mktemp(name)
        AutoModelForCausalLM.from_config(family_config(name)).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        out[name] = folder
    return out


def ids(batch=2, seq=12, seed=0):
    return torch.randint(0, V, (batch, seq), generator=torch.Generator().manual_seed(seed))


def dense_and_upcycled(folder, **spec):
    dense = load_dense_hf(folder).eval()
    return dense, upcycle(load_dense_hf(folder), **spec).eval()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("router", EXACT)
def test_step0_logits_equal_dense(dense_folders, family, router):
    dense, moe = dense_and_upcycled(dense_folders[family], router=router)
    x = ids()
    with torch.no_grad():
        diff = (moe(x).logits - dense(x).logits).abs().max().item()
    assert diff < 1e-5, f"{family}/{router}: max |Δlogit| {diff}"
    assert is_upcycled(moe) and type(moe).__name__ == "Upcycled" + type(dense).__name__
    n_routed = 3 if router.startswith("sharede") else 4
    assert all(l.cfg.n_routed == n_routed for l in moe_layers(moe)) and len(moe_layers(moe)) == 2


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_moeut_normalised_is_exact(dense_folders, family):
    dense, moe = dense_and_upcycled(dense_folders[family], router="moeut", router_opts={"normalize": True})
    x = ids()
    with torch.no_grad():
        assert (moe(x).logits - dense(x).logits).abs().max() < 1e-5


def _layer0(model):
    return decoder_layers(model)[0].mlp


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])
def test_moeut_and_routed_scale_differ_as_documented(dense_folders, family):
    """moeut: y = (Σ_{k∈TopK} σ(h_k))·g(x); sharede_v3 with routed_scale r: y = (mix + (1−mix)·r)·g(x)."""
    dense = load_dense_hf(dense_folders[family]).eval()
    g = copy.deepcopy(_layer0(dense))
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        g_x = g(x)
        moeut = upcycle(copy.deepcopy(dense), router="moeut").eval()
        layer = _layer0(moeut)
        W = layer.moe.router.gate.weight
        c = torch.empty(2, 7, 1)
        for b in range(2):      # naive: per token, the K largest sigmoids
            for t in range(7):
                s = sorted((torch.sigmoid(W[n] @ x[b, t]).item() for n in range(4)), reverse=True)
                c[b, t, 0] = sum(s[:2])
        assert (layer(x) - c * g_x).abs().max() < 1e-5
        assert (c - 1).abs().max() > 1e-3  # not the dense output: a real, documented difference
        v3 = upcycle(copy.deepcopy(dense), router="sharede_v3", router_opts={"routed_scale": 2.0}).eval()
        assert (_layer0(v3)(x) - 1.5 * g_x).abs().max() < 1e-5   # mix 0.5: 0.5 + 0.5·2


@pytest.mark.parametrize("n_shared", [1, 2])
def test_sharede_shared_expert_is_the_dense_mlp(dense_folders, n_shared):
    dense = load_dense_hf(dense_folders["llama"]).eval()
    g = copy.deepcopy(_layer0(dense))
    moe = upcycle(dense, router="sharede_v2", experts=4, top_k=3, router_opts={"n_shared": n_shared}).eval()
    layer = _layer0(moe).moe
    assert layer.cfg.router_opts.shared_mix == 0.5 and layer.cfg.n_shared == n_shared
    x = torch.randn(9, 32)
    with torch.no_grad():
        assert (layer.shared(x) - g(x)).abs().max() < 1e-5
        assert (layer(x).y - g(x)).abs().max() < 1e-5


def test_router_init_is_seeded_normal_002(dense_folders):
    _, moe = dense_and_upcycled(dense_folders["qwen2"], router="smoe")
    gen = torch.Generator().manual_seed(42)
    for layer in moe_layers(moe):  # layers in order, one draw each
        expected = torch.empty(4, 32).normal_(0.0, ROUTER_STD, generator=gen)
        assert torch.equal(layer.router.gate.weight, expected)
    _, again = dense_and_upcycled(dense_folders["qwen2"], router="smoe")
    assert all(torch.equal(a.router.gate.weight, b.router.gate.weight)
               for a, b in zip(moe_layers(moe), moe_layers(again)))


def test_noise_option_breaks_the_copies(dense_folders):
    dense = load_dense_hf(dense_folders["mistral"])
    w1 = torch.cat([_layer0(dense).gate_proj.weight, _layer0(dense).up_proj.weight]).detach()
    moe = upcycle(dense, router="smoe", noise=0.01)
    e = moe_layers(moe)[0].experts.w1.detach()
    rel = ((e - w1).std() / w1.std()).item()
    assert 0.008 < rel < 0.012, rel
    assert all(not torch.equal(e[i], e[j]) for i in range(4) for j in range(i))


def test_layers_option_and_errors(dense_folders):
    moe = upcycle(load_dense_hf(dense_folders["llama"]), layers="1")
    kinds = [type(l.mlp).__name__ for l in decoder_layers(moe)]
    assert kinds == ["LlamaMLP", "UpcycledMLP"]
    with pytest.raises(ConfigError, match=r"layers \[5\] out of range: the model has 2 decoder layers"):
        upcycle(load_dense_hf(dense_folders["llama"]), layers="0,5")
    with pytest.raises(ConfigError, match="comma-separated"):
        UpcycleConfig(layers="first")
    with pytest.raises(UpcycleError, match="already upcycled"):
        upcycle(moe)


def test_unsupported_models_get_one_clear_error():
    neox = AutoModelForCausalLM.from_config(transformers.GPTNeoXConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4))
    with pytest.raises(UpcycleError, match=r"decoder layer 0 mlp \(GPTNeoXMLP\): expected gate_proj/up_proj/down_proj.*"
                                           r"it has dense_h_to_4h: Linear"):
        upcycle(neox)
    opt = AutoModelForCausalLM.from_config(transformers.OPTConfig(
        vocab_size=V, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32))
    with pytest.raises(UpcycleError, match="no list of layers with an `mlp` module"):
        upcycle(opt)


def test_save_load_round_trip_and_generate(dense_folders, tmp_path):
    for family in FAMILIES:
        _, moe = dense_and_upcycled(dense_folders[family], router="competesmoe")
        out = tmp_path / family
        moe.save_pretrained(out)
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["model_type"] == "competesmoe_upcycled"
        assert cfg["competesmoe"]["upcycle"]["router"] == "competesmoe"
        back = AutoModelForCausalLM.from_pretrained(out).eval()
        assert type(back) is type(moe)
        sd, sd2 = moe.state_dict(), back.state_dict()
        assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
        x = ids()
        with torch.no_grad():
            assert torch.equal(back(x).logits, moe(x).logits)
        g1 = moe.generate(x[:, :4], max_new_tokens=5, do_sample=False)
        g2 = back.generate(x[:, :4], max_new_tokens=5, do_sample=False)
        assert g1.shape == (2, 9) and torch.equal(g1, g2)
        back.save_pretrained(tmp_path / f"{family}-again")        # and once more
        again = AutoModelForCausalLM.from_pretrained(tmp_path / f"{family}-again")
        assert all(torch.equal(v, again.state_dict()[k]) for k, v in sd2.items())


def test_loss_includes_aux_loss_switchable(dense_folders):
    dense, moe = dense_and_upcycled(dense_folders["qwen3"], router="smoe")
    x = ids()
    with torch.no_grad():
        out = moe(x, labels=x)
        lm = moe(x, labels=x, include_aux_loss=False)
        ref = dense(x, labels=x)
    per_layer = sum(o.aux_loss for o in moe.moe_outputs)
    assert torch.allclose(out.aux_loss, per_layer) and out.aux_loss > 0
    assert torch.allclose(out.loss, lm.loss + out.aux_loss)
    assert abs(lm.loss.item() - ref.loss.item()) < 1e-5          # step 0: the dense LM loss
    moe.config.include_aux_loss = False
    with torch.no_grad():
        assert torch.allclose(moe(x, labels=x).loss, lm.loss)


def test_identical_experts_tie_in_the_competition(dense_folders):
    """All affinities tie: every token gets the same K winners (torch.topk's order for equal values),
    s_C = 1/K, the output is the dense MLP's, the diversity loss is 1 (identical outputs)."""
    dense = load_dense_hf(dense_folders["llama"])
    g = copy.deepcopy(_layer0(dense))
    layer = _layer0(upcycle(dense, router="competesmoe")).moe.train()
    x = torch.randn(40, 32)
    from competesmoe.moe.competition import all_affinities
    a = all_affinities(layer.experts, x, "softplus", 16)[0]
    assert torch.equal(a, a[:, :1].expand_as(a))                 # exact ties
    out = layer(x, compete=True)
    assert out.competed
    assert (out.indices == out.indices[:1]).all()                # the same set for every token
    assert torch.equal(out.indices[0], torch.ones(4).topk(2).indices)
    assert torch.allclose(out.weights, torch.full_like(out.weights, 0.5))
    assert (out.y - g(x)).abs().max() < 1e-5
    assert abs(out.stats["diversity"].item() - 1.0) < 1e-5


def test_training_breaks_the_symmetry(dense_folders):
    """A competition step gives its (tied) winners identical gradients and the losers none, so it keeps
    the copies equal in pairs; a routed step weights the experts differently per token and separates them."""
    def spread(layer):  # max over expert pairs of max |w_i - w_j|
        w = layer.experts.w1.detach()
        return [[(w[i] - w[j]).abs().max().item() for j in range(4)] for i in range(4)]

    dense = load_dense_hf(dense_folders["llama"])
    layer = _layer0(upcycle(dense, router="competesmoe")).moe.train()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x, target = torch.randn(64, 32), torch.randn(64, 32)
    (layer(x, compete=True).y - target).square().mean().backward()
    opt.step(), opt.zero_grad()
    s = spread(layer)
    winners = torch.ones(4).topk(2).indices.tolist()
    losers = [i for i in range(4) if i not in winners]
    assert s[winners[0]][winners[1]] == 0 and s[losers[0]][losers[1]] == 0 and s[winners[0]][losers[0]] > 0
    (layer(x, compete=False).y - target).square().mean().backward()
    opt.step()
    s = spread(layer)
    assert min(s[i][j] for i in range(4) for j in range(i)) > 1e-6
    a = __import__("competesmoe.moe.competition", fromlist=["all_affinities"]).all_affinities(
        layer.experts, x, "softplus", 64)[0]
    assert (a.max(-1).values > a.min(-1).values).all()           # no tie left


def test_llava_language_target_upcycles_only_the_language_model(tmp_path):
    """targets=language on a VLM (the default there is vision,connector: tests/test_vlm.py)."""
    text = transformers.LlamaConfig(**SMALL)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=30, patch_size=6)
    vlm = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=V - 1)).eval()
    x = torch.cat([torch.full((1, 25), V - 1), ids(1, 6)], dim=1)       # 25 image patches, then text
    pixels = torch.randn(1, 3, 30, 30)
    with torch.no_grad():
        ref = vlm(input_ids=x, pixel_values=pixels).logits
    moe = upcycle(vlm, router="competesmoe", targets="language").eval()
    assert moe.config.competesmoe["upcycle"]["targets"] == "language"
    assert sum(isinstance(m, UpcycledMLP) for m in moe.model.language_model.modules()) == 2
    assert not isinstance(moe.model.multi_modal_projector, UpcycledMLP)
    assert not any(isinstance(m, UpcycledMLP) for m in moe.model.vision_tower.modules())
    with torch.no_grad():
        out = moe(input_ids=x, pixel_values=pixels, labels=x)
    assert (out.logits - ref).abs().max() < 1e-5 and out.aux_loss > 0
    moe.save_pretrained(tmp_path)
    back = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(back(input_ids=x, pixel_values=pixels).logits, out.logits)


def test_cli_upcycle_copies_the_tokenizer(dense_folders, tmp_path, capsys):
    out = tmp_path / "moe"
    rc = cli_main(["upcycle", str(dense_folders["gpt2"]), str(out), "--experts", "3", "--top-k", "1",
                   "--router", "xmoe", "--set", "temperature=0.5"])
    assert rc == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    layer = moe_layers(model)[0]
    assert (layer.cfg.n_experts, layer.cfg.top_k, layer.cfg.router, layer.cfg.router_opts.temperature) == (3, 1, "xmoe", 0.5)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("the cat").input_ids == AutoTokenizer.from_pretrained(dense_folders["gpt2"])("the cat").input_ids
    assert cli_main(["upcycle", str(dense_folders["gpt2"]), str(out)]) == 1
    assert "not empty; pass --force" in capsys.readouterr().err
    assert cli_main(["upcycle", str(dense_folders["gpt2"]), str(tmp_path / "x"), "--layers", "7"]) == 1
    assert "out of range" in capsys.readouterr().err
    missing = tmp_path / "no-such-model"
    assert cli_main(["upcycle", str(missing), str(tmp_path / "y")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err and "Traceback" not in err
    assert not (tmp_path / "y").exists()


# --- our own MoETransformer, trained with model.dense=true ------------------------------------------
def dense_transformer(**kw) -> MoETransformer:
    from competesmoe.config import MoEConfig
    cfg = ModelConfig(vocab_size=V, n_layers=2, d_model=32, n_heads=4, max_seq_len=32, dense=True,
                      moe=MoEConfig(d_model=32, d_expert=16, n_experts=8, top_k=2, activation="relu", **kw))
    return MoETransformer(cfg).eval()


def test_dense_option_is_one_ffn_of_the_active_width():
    model = dense_transformer()
    layer = model.blocks[0].moe
    assert (layer.cfg.n_experts, layer.cfg.top_k, layer.cfg.d_expert) == (1, 1, 32)
    x = torch.randn(5, 32)
    w1, w2 = layer.experts.w1[0], layer.experts.w2[0]
    naive = torch.stack([w2 @ torch.relu(w1 @ x[t]) for t in range(5)])
    with torch.no_grad():
        assert (layer(x).y - naive).abs().max() < 1e-6
    assert model.num_parameters(active=True) == model.num_parameters()


@pytest.mark.parametrize("router", EXACT)
def test_upcycle_transformer_equals_dense(router):
    dense = dense_transformer()
    moe = upcycle_transformer(dense, UpcycleConfig(router=router, experts=4, top_k=2)).eval()
    assert not moe.cfg.dense and moe.cfg.moe.d_expert == 32 and moe.cfg.moe.router == router
    x = ids(2, 10)
    with torch.no_grad():
        assert (moe(x).logits - dense(x).logits).abs().max() < 1e-5
    with pytest.raises(UpcycleError, match="already an MoE"):
        upcycle_transformer(moe, UpcycleConfig())


def test_cli_upcycles_an_exported_dense_model(tmp_path):
    from competesmoe.model.hf import save_hf
    from competesmoe.data.tokenizer import train_bpe
    dense = dense_transformer()
    tok = train_bpe(["the cat sat on the mat"] * 10, V)
    src = save_hf(dense, tok, tmp_path / "dense")
    assert cli_main(["upcycle", str(src), str(tmp_path / "moe"), "--router", "competesmoe"]) == 0
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    x = ids(1, 8)
    with torch.no_grad():
        assert (back(x).logits - dense(x).logits).abs().max() < 1e-5


def test_upcycled_layers_take_the_model_dtype(dense_folders):
    dense = load_dense_hf(dense_folders["qwen2"]).to(torch.bfloat16).eval()
    moe = upcycle(copy.deepcopy(dense), router="sharede_v3", router_opts={"bias_balance": True}).eval()
    layer = moe_layers(moe)[0]
    assert {p.dtype for p in layer.parameters()} == {torch.bfloat16}
    assert layer.router.expert_bias.dtype == layer.router.load.dtype == torch.float32  # counts stay exact
    x = ids()
    with torch.no_grad():   # the routing weights sum to 1 only up to bf16 rounding: one bf16 ulp at |logit| < 1
        ref = dense(x).logits.float()
        assert ref.abs().max() < 1 and (moe(x).logits.float() - ref).abs().max() <= 2 ** -8


def _tied(model) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_from_a_folder_tied_and_untied(family, tied, tmp_path):
    """save dense -> load -> upcycle -> save -> reload: every weight found (an untied head too), logits exact."""
    cfg = family_config(family)
    cfg.tie_word_embeddings = tied
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "dense")
    dense = load_dense_hf(tmp_path / "dense").eval()
    assert _tied(dense) == tied
    moe = upcycle(load_dense_hf(tmp_path / "dense"), router="competesmoe").eval()
    moe.save_pretrained(tmp_path / "moe")
    back, info = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", output_loading_info=True)
    back.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert _tied(back) == tied
    assert torch.equal(back.get_output_embeddings().weight, dense.get_output_embeddings().weight)
    x = ids()
    with torch.no_grad():
        assert torch.equal(back(x).logits, moe(x).logits)
        assert (back(x).logits - dense(x).logits).abs().max() < 1e-5
