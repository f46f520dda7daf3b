"""Speed features of the model that must not change results: the block-wise LM loss, head-dim padding
for flash attention, and `train.compile`."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import reference as ref
from competesmoe import MoEConfig
from competesmoe.moe.kernels import plan as plan_mod
from competesmoe.model.loss import lm_cross_entropy
from competesmoe.model.transformer import Attention, ModelConfig, MoETransformer
from competesmoe.train import Trainer


# --- the LM loss ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blockwise_cross_entropy_equals_float32_reference(monkeypatch, dtype):
    monkeypatch.setitem(plan_mod._BLOCK_ELEMENTS, "cpu", 3 * 50)          # blocks of 3 rows, 13 rows
    logits = (3 * torch.randn(13, 50)).to(dtype).requires_grad_()
    targets = torch.randint(0, 50, (13,))
    targets[[2, 7]] = -100                                                # ignored rows
    got = lm_cross_entropy(logits, targets)
    got.backward()
    ref_in = logits.detach().float().requires_grad_()
    want = F.cross_entropy(ref_in, targets, ignore_index=-100)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert logits.grad.dtype == dtype
    # bf16: the reference gradient rounded to bf16 once, as ours is
    torch.testing.assert_close(logits.grad, ref_in.grad.to(dtype), rtol=1e-6 if dtype == torch.float32 else 1e-2,
                               atol=1e-7)
    assert logits.grad[[2, 7]].abs().sum() == 0


def test_blockwise_cross_entropy_keeps_no_float32_copy_of_bf16_logits():
    logits = torch.randn(64, 1000).bfloat16().requires_grad_()
    targets = torch.randint(0, 1000, (64,))
    with ref.saved_storages() as saved:
        lm_cross_entropy(logits, targets)
    assert sum(saved.values()) <= logits.numel() * 2 + targets.numel() * 8 + 1024   # logits + targets only
    with ref.saved_storages() as saved:
        F.cross_entropy(logits.float(), targets)                             # the old way: fp32 copies
    assert sum(saved.values()) >= logits.numel() * 4


def test_cross_entropy_shape_errors_are_clear():
    with pytest.raises(ValueError, match="logits \\[N, V\\] and targets \\[N\\]"):
        lm_cross_entropy(torch.randn(2, 3, 4), torch.zeros(2, dtype=torch.long))


# --- attention head-dim padding -------------------------------------------------------------------------
def test_padded_head_dim_gives_the_same_attention():
    """paper-151m's head dim 82 is padded to 88 for flash kernels on CUDA; forced here on CPU (d_head 10)."""
    cfg = ModelConfig(vocab_size=32, n_layers=1, d_model=24, n_heads=2, d_head=10, max_seq_len=16,
                      moe=MoEConfig(d_model=24, d_expert=8, n_experts=2, top_k=1))
    att = Attention(cfg)
    x = torch.randn(2, 7, 24, requires_grad=True)
    pos = torch.arange(7)
    outs = []
    for devices in ((), ("cpu",)):
        att.pad_devices = devices
        att.zero_grad()
        x.grad = None
        o, _ = att(x, pos)
        o2, _ = att(x[:, -1:], torch.arange(7, 8), cache=(att(x, pos)[1]))    # with a KV cache (explicit mask)
        (o.square().sum() + o2.square().sum()).backward()
        outs.append([o, o2, x.grad, att.qkv.weight.grad, att.out.weight.grad])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- train.compile --------------------------------------------------------------------------------------
SMALL = ["model.n_layers=2", "model.d_model=32", "model.moe.d_model=32", "model.moe.d_expert=16",
         "model.moe.n_experts=4", "model.moe.top_k=2", "model.max_seq_len=32", "data.seq_len=32",
         "data.vocab_size=300", "data.synthetic_train_chars=20000", "data.synthetic_valid_chars=5000",
         "data.progress=false", "train.batch_size=4", "train.eval_batches=1", "train.log_every=1",
         "train.tensorboard=false", "train.warmup_steps=1", "train.steps=3", "train.eval_every=3",
         "train.ckpt_every=3", "router=smoe"]


def test_train_compile_gives_the_eager_losses(tmp_path, monkeypatch):
    """train.compile=true compiles the model's blocks in place; its losses equal eager ones to 1e-5 (relative).

    Inductor's C++ code generation takes minutes on 2 CPU cores, so the test compiles with the
    `aot_eager` backend: the same graph capture and AOT autograd, without code generation."""
    from competesmoe.train import run_preset
    calls = []
    original = torch.nn.Module.compile

    def compile_aot_eager(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return original(self, backend="aot_eager")

    monkeypatch.setattr(torch.nn.Module, "compile", compile_aot_eager)
    losses = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        cfg = run_preset("tiny", SMALL + [f"train.out_dir={out}", f"data.cache_dir={tmp_path / 'cache'}",
                                          f"train.compile={flag}"])
        Trainer(cfg, log=lambda *_: None).train()
        rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
        losses[flag] = [r["loss"] for r in rows if "loss" in r and "step" in r]
    assert calls == ["Block"] * cfg.model.n_layers                 # MoETransformer.compile: one per block
    assert len(losses["true"]) == len(losses["false"]) >= 3
    for a, b in zip(losses["true"], losses["false"]):
        assert a == pytest.approx(b, rel=1e-5)
