"""Vision–language models (LLaVA-style, Appendix I.1): tiny models built from configs, images from Pillow.

Upcycling the vision encoder's MLPs, the connector and/or the language model's MLPs, step-0 equality
with the dense model, save/reload from folders (tied and untied LM heads), generation with images.
"""
from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForImageTextToText
from transformers.utils import logging as hf_logging

import competesmoe  # noqa: F401  (registers the model types)
from competesmoe.model.upcycle import upcycle
from competesmoe.train.loading import load_dense_hf

hf_logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_thread")

V = 300
IMAGE_TOKEN = V - 1
TEXT = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
VISION = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, image_size=30,
              patch_size=6)
N_PATCHES = 25


def vlm_config(vision: str = "siglip", text: str = "llama", tied: bool = False) -> transformers.LlavaConfig:
    vcfg = (transformers.SiglipVisionConfig if vision == "siglip" else transformers.CLIPVisionConfig)(**VISION)
    tcfg = (transformers.LlamaConfig if text == "llama" else transformers.Phi3Config)(
        **TEXT, tie_word_embeddings=tied, **({"pad_token_id": 0} if text == "phi3" else {}))
    # SigLIP has no CLS token: LLaVA keeps every patch ("full"); CLIP's CLS is dropped ("default")
    return transformers.LlavaConfig(vision_config=vcfg, text_config=tcfg, image_token_id=IMAGE_TOKEN,
                                    vision_feature_select_strategy="full" if vision == "siglip" else "default",
                                    vision_feature_layer=-1 if vision == "siglip" else -2, tie_word_embeddings=tied)


def vlm_inputs(batch: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, V - 1, (batch, 6), generator=g)
    ids = torch.cat([text[:, :2], torch.full((batch, N_PATCHES), IMAGE_TOKEN), text[:, 2:]], dim=1)
    return ids, torch.randn(batch, 3, 30, 30, generator=g)


def save_dense(folder, **kw):
    torch.manual_seed(1)
    transformers.LlavaForConditionalGeneration(vlm_config(**kw)).save_pretrained(folder)
    return folder


VLMS = [("siglip", "llama"), ("clip", "llama"), ("siglip", "phi3")]


@pytest.mark.parametrize("vision,text", VLMS)
@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_from_a_folder(vision, text, tied, tmp_path):
    """save dense -> load -> upcycle -> save -> reload: the untied head (saved by transformers under the
    legacy key language_model.lm_head.weight) is found again; logits exact."""
    src = save_dense(tmp_path / "dense", vision=vision, text=text, tied=tied)
    dense = load_dense_hf(src).eval()
    moe = upcycle(load_dense_hf(src), router="competesmoe").eval()
    moe.save_pretrained(tmp_path / "moe")
    back, info = AutoModelForImageTextToText.from_pretrained(tmp_path / "moe", output_loading_info=True)
    back.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert (back.lm_head.weight is back.get_input_embeddings().weight) == tied
    assert torch.equal(back.lm_head.weight, dense.lm_head.weight)
    ids, pixels = vlm_inputs()
    with torch.no_grad():
        out = back(input_ids=ids, pixel_values=pixels).logits
        assert torch.equal(out, moe(input_ids=ids, pixel_values=pixels).logits)
        assert (out - dense(input_ids=ids, pixel_values=pixels).logits).abs().max() < 1e-5
    back.save_pretrained(tmp_path / "again")                    # and once more
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, pixel_values=pixels).logits, out)


# --- targets: vision, connector, language ------------------------------------------------------------
EXACT = ["smoe", "competesmoe", "xmoe", "pcosine", "sharede_v2", "sharede_v3"]


def kinds(model):
    """Which parts are MoE: (vision layers, connector, decoder layers) as booleans."""
    from competesmoe.model.upcycle import UpcycledMLP, decoder_layers, vision_layers
    return ([isinstance(l.mlp, UpcycledMLP) for l in vision_layers(model)],
            isinstance(model.model.multi_modal_projector, UpcycledMLP),
            [isinstance(l.mlp, UpcycledMLP) for l in decoder_layers(model)])


def test_default_targets_vlm_vision_and_connector_lm_language(tmp_path):
    vlm = upcycle(transformers.LlavaForConditionalGeneration(vlm_config()))
    assert kinds(vlm) == ([True, True], True, [False, False])        # Appendix I.1: the LM stays dense
    assert vlm.config.competesmoe["upcycle"]["targets"] == "vision,connector"
    lm = upcycle(transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT)))
    assert lm.config.competesmoe["upcycle"]["targets"] == "language"
    both = upcycle(transformers.LlavaForConditionalGeneration(vlm_config()), targets="language,vision", layers="1")
    assert kinds(both) == ([False, True], False, [False, True])


@pytest.mark.parametrize("vision,text", VLMS)
@pytest.mark.parametrize("router", EXACT)
def test_step0_with_an_image_equals_dense(vision, text, router):
    """Every expert a copy of the dense MLP (vision MLP, whole projector, decoder MLP) and weights that
    sum to 1: logits with an image equal the dense model's."""
    torch.manual_seed(2)
    dense = transformers.LlavaForConditionalGeneration(vlm_config(vision, text)).eval()
    ids, pixels = vlm_inputs(batch=2)
    with torch.no_grad():
        ref = dense(input_ids=ids, pixel_values=pixels).logits
        moe = upcycle(dense, router=router, targets="vision,connector,language").eval()
        assert kinds(moe) == ([True, True], True, [True, True])
        out = moe(input_ids=ids, pixel_values=pixels, labels=ids)
    assert (out.logits - ref).abs().max() < 1e-5
    assert len(moe.moe_outputs) == 5


def test_router_init_seeded_in_order_vision_connector_language():
    from competesmoe.model.upcycle import ROUTER_STD
    from competesmoe import moe_layers
    moe = upcycle(transformers.LlavaForConditionalGeneration(vlm_config()), router="smoe",
                  targets="vision,connector,language")
    gen = torch.Generator().manual_seed(42)
    widths = [VISION["hidden_size"]] * 3 + [TEXT["hidden_size"]] * 2   # the connector reads the vision width
    layers = moe_layers(moe)
    assert len(layers) == 5
    for layer, d in zip(layers, widths):
        assert torch.equal(layer.router.gate.weight, torch.empty(4, d).normal_(0.0, ROUTER_STD, generator=gen))


def test_aux_loss_includes_vision_and_connector_layers():
    moe = upcycle(transformers.LlavaForConditionalGeneration(vlm_config()), router="smoe").train()
    ids, pixels = vlm_inputs(batch=2)
    out = moe(input_ids=ids, pixel_values=pixels, labels=ids)
    assert len(moe.moe_outputs) == 3                                  # 2 vision layers + the connector
    assert torch.allclose(out.aux_loss, sum(o.aux_loss for o in moe.moe_outputs)) and out.aux_loss > 0
    lm = moe(input_ids=ids, pixel_values=pixels, labels=ids, include_aux_loss=False).loss
    assert torch.allclose(out.loss, lm + out.aux_loss)
    out.loss.backward()
    from competesmoe.model.upcycle import vision_layers
    for layer in vision_layers(moe):
        assert layer.mlp.moe.router.gate.weight.grad.abs().sum() > 0
    assert moe.model.multi_modal_projector.moe.router.gate.weight.grad.abs().sum() > 0


def test_connector_experts_are_copies_of_the_whole_projector():
    torch.manual_seed(0)
    dense = transformers.LlavaForConditionalGeneration(vlm_config("siglip", "phi3"))
    p = dense.model.multi_modal_projector
    w1, b1, w2, b2 = (t.detach().clone() for t in (p.linear_1.weight, p.linear_1.bias, p.linear_2.weight, p.linear_2.bias))
    moe = upcycle(dense, targets="connector")
    layer = moe.model.multi_modal_projector.moe
    assert (layer.cfg.d_model, layer.cfg.d_expert, layer.cfg.out_dim) == (24, 32, 32)
    e = layer.experts
    for n in range(4):
        assert torch.equal(e.w1[n], w1) and torch.equal(e.b1[n], b1) and torch.equal(e.w2[n], w2) and torch.equal(e.b2[n], b2)
    x = torch.randn(7, 24)
    with torch.no_grad():
        naive = torch.nn.functional.gelu(x @ w1.T + b1) @ w2.T + b2   # projector_hidden_act gelu
        assert (moe.model.multi_modal_projector(x) - naive).abs().max() < 1e-5


def test_save_reload_exact_and_generate_with_images(tmp_path):
    moe = upcycle(transformers.LlavaForConditionalGeneration(vlm_config("clip", "llama")), router="competesmoe").eval()
    moe.save_pretrained(tmp_path)
    back = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(back) is type(moe) and kinds(back) == kinds(moe)
    sd, sd2 = moe.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    ids, pixels = vlm_inputs()
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids, pixel_values=pixels).logits, moe(input_ids=ids, pixel_values=pixels).logits)
    g1 = moe.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=4, do_sample=False)
    g2 = back.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=4, do_sample=False)
    assert g1.shape == (1, ids.shape[1] + 4) and torch.equal(g1, g2)


def test_targets_errors_name_what_was_found():
    from competesmoe.config import ConfigError
    from competesmoe.model.upcycle import UpcycleError
    with pytest.raises(ConfigError, match="targets must be 'auto' or a comma-separated subset of vision,connector,language"):
        upcycle(transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT)), targets="vision,decoder")
    with pytest.raises(UpcycleError, match=r"targets vision: LlamaForCausalLM has no vision encoder"):
        upcycle(transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT)), targets="vision")
    with pytest.raises(UpcycleError, match=r"targets connector: LlamaForCausalLM has no connector"):
        upcycle(transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT)), targets="connector")
    from competesmoe.model.upcycle import vision_layers
    vlm = transformers.LlavaForConditionalGeneration(vlm_config())
    vision_layers(vlm)[0].mlp = torch.nn.Sequential(torch.nn.Linear(24, 40))
    with pytest.raises(UpcycleError, match=r"cannot upcycle vision layer 0 mlp \(Sequential\): expected fc1/fc2 nn.Linear "
                                           r"with activation_fn \(CLIP, SigLIP\); it has 0: Linear"):
        upcycle(vlm)
    with pytest.raises(ConfigError, match=r"layers \[3\] out of range: the model has 2 vision encoder layers"):
        upcycle(transformers.LlavaForConditionalGeneration(vlm_config()), layers="3")


# --- competesmoe upcycle --dry-run ---------------------------------------------------------------------
def paper_config() -> transformers.LlavaConfig:
    """Table 1's model from the public configs: Phi-3.5-mini (hidden 3072, intermediate 8192, 32 layers,
    32 heads, vocab 32064, untied head) + SigLIP-SO400M-patch14-224 (hidden 1152, intermediate 4304,
    27 layers, 16 heads, patch 14, image 224) + a two-layer GELU MLP connector 1152 -> 3072 -> 3072."""
    text = transformers.Phi3Config(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                                   max_position_embeddings=131072, tie_word_embeddings=False, pad_token_id=32000)
    vision = transformers.SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                             num_attention_heads=16, patch_size=14, image_size=224)
    return transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=32044,
                                    projector_hidden_act="gelu", vision_feature_select_strategy="full",
                                    vision_feature_layer=-1)


def _counts(text: str) -> tuple[int, int]:
    import re
    m = re.search(r"upcycled [\d.]+ B total \(([\d,]+)\), [\d.]+ [BM] active per token \(([\d,]+)\)", text)
    assert m, text
    return int(m.group(1).replace(",", "")), int(m.group(2).replace(",", ""))


def test_dry_run_paper_model_is_5_1b_from_config_json_alone(tmp_path, capsys):
    from competesmoe.cli import main as cli_main
    paper_config().save_pretrained(tmp_path / "src")       # config.json only: no weights
    assert cli_main(["upcycle", str(tmp_path / "src"), str(tmp_path / "out"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    total, active = _counts(text)
    assert abs(total / 5.1e9 - 1) < 0.02, text                # Table 1: 5.1 B
    assert "vision layers 0-26 mlp: 1152 -> 4304 -> 1152" in text and "connector: 1152 -> 3072 -> 3072" in text
    assert not (tmp_path / "out").exists()
    assert cli_main(["upcycle", str(tmp_path / "src"), str(tmp_path / "out"), "--dry-run", "--targets", "language"]) == 0
    text = capsys.readouterr().out
    total, _ = _counts(text)
    assert abs(total / 11.5e9 - 1) < 0.02 and "decoder layers 0-31 mlp: 3072 -> 8192 -> 3072" in text, text


@pytest.mark.parametrize("targets,router", [("vision,connector", "competesmoe"), ("language", "smoe"),
                                            ("vision,connector,language", "sharede_v2")])
def test_dry_run_counts_equal_the_built_model(tmp_path, targets, router):
    """Meta-device counts == the counts of the model upcycled for real; active per token counted here
    independently: the dense model + per MoE layer (K_routed − 1) more routed experts, the router and,
    for sharede, the shared FFN (a copy of the dense MLP)."""
    from competesmoe import moe_layers
    from competesmoe.model.upcycle import UpcycleConfig
    from competesmoe.train.upcycle_plan import plan
    cfg = vlm_config("siglip", "phi3")
    cfg.save_pretrained(tmp_path)
    spec = UpcycleConfig(targets=targets, router=router, experts=4, top_k=2)
    dry = plan(tmp_path, spec)
    dense = transformers.LlavaForConditionalGeneration(cfg)
    dense_n = sum(p.numel() for p in dense.parameters())
    real = upcycle(dense, spec)
    total = sum(p.numel() for p in real.parameters())
    assert (dry.dense_total, dry.total) == (dense_n, total)
    active = dense_n
    for layer in moe_layers(real):
        mlp = sum(p[0].numel() for p in layer.experts.parameters())     # one routed expert = one dense MLP
        shared = 0 if layer.shared is None else sum(p.numel() for p in layer.shared.parameters())
        active += (layer.cfg.k_routed - 1) * mlp + sum(p.numel() for p in layer.router.parameters()) + shared
    assert dry.active == active


def test_step0_moeut_normalised_with_an_image_equals_dense():
    torch.manual_seed(2)
    dense = transformers.LlavaForConditionalGeneration(vlm_config("clip", "llama")).eval()
    ids, pixels = vlm_inputs(batch=2)
    with torch.no_grad():
        ref = dense(input_ids=ids, pixel_values=pixels).logits
        moe = upcycle(dense, router="moeut", router_opts={"normalize": True}, targets="vision,connector,language").eval()
        assert (moe(input_ids=ids, pixel_values=pixels).logits - ref).abs().max() < 1e-5
