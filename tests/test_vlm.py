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
