"""One training step of an upcycled model of every family gives the same gradients on every dispatch path
(loop, grouped_mm, Triton interpreted): the experts use the dense model's own activation module and all
paths take φ and dφ from one `Activation`. Gemma's gated GELU-tanh is the case that used to differ."""
from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from competesmoe.model.upcycle import upcycle
from competesmoe.moe import CompetitionSchedule, attach_schedule, moe_layers
from competesmoe.moe.kernels import triton_moe

pytestmark = pytest.mark.usefixtures("one_thread")

V = 200
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "llama": lambda c: c.LlamaConfig(**SMALL, mlp_bias=True),                  # gated SiLU, biases
    "qwen3": lambda c: c.Qwen3Config(**SMALL, head_dim=8),
    "phi3": lambda c: c.Phi3Config(**SMALL, pad_token_id=0),                   # fused gate_up_proj
    "gemma": lambda c: c.GemmaConfig(**SMALL, head_dim=8, hidden_activation="gelu_pytorch_tanh"),  # gated GELU-tanh
    "gpt2": lambda c: c.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,   # gelu_new
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
}
PATHS = ["loop", "grouped_mm"] + (["triton"] if triton_moe is not None and triton_moe.available(torch.device("cpu")) else [])


def _step_grads(model, path: str, compete: bool) -> dict[str, torch.Tensor]:
    layers = moe_layers(model)
    for moe in layers:
        moe.experts.backend = path
    # ω = 1 and A_max = L: every layer competes at step 0 of the competition run
    attach_schedule(model, CompetitionSchedule(len(layers), 1, omega=float(compete), a_max=len(layers)))
    model.zero_grad(set_to_none=True)
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(o.competed == compete for o in model.moe_outputs)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("compete", [False, True], ids=["routed", "competition"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_training_step_has_the_same_gradients_on_every_path(family, compete):
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(FAMILIES[family](transformers))
    model = upcycle(model, experts=4, top_k=2, router="competesmoe", noise=0.1).train()   # noise: distinct experts
    grads = {path: _step_grads(model, path, compete) for path in PATHS}
    ref = grads["grouped_mm"]
    assert any("moe.experts.w1" in n for n in ref) and len(ref) > 10
    for path in PATHS:
        assert grads[path].keys() == ref.keys(), path
        for name, g in ref.items():
            scale = g.abs().max().item() + 1e-12
            torch.testing.assert_close(grads[path][name], g, rtol=0, atol=1e-4 * scale,
                                       msg=lambda m: f"{path} vs grouped_mm, {name}: {m}")
