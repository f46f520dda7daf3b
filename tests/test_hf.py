"""Hugging Face wrapper: save/load round trip, Auto classes, generate with and without cache, export."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from competesmoe.config import MoEConfig, RouterConfig
from competesmoe.model.hf import CompeteSMoEConfig, CompeteSMoEForCausalLM, register, save_hf
from competesmoe.model.transformer import ModelConfig, MoETransformer


def train_tiny_run(base: Path) -> Path:
    """A 2-step tiny run, trained once per session (shared by test_hf.py and test_eval_cli.py)."""
    run = base / "tiny_run"
    if (run / "checkpoints").is_dir():
        return run
    from competesmoe.train import run_preset
    from competesmoe.train.loop import Trainer
    cfg = run_preset("tiny", {"train.steps": 2, "train.eval_every": 2, "train.eval_batches": 1, "train.batch_size": 4,
                              "train.ckpt_every": 2, "train.out_dir": str(run), "train.tensorboard": False,
                              "data.cache_dir": str(base / "cache"), "data.synthetic_train_chars": 60_000,
                              "data.synthetic_valid_chars": 12_000, "data.vocab_size": 512, "data.seq_len": 64,
                              "model.max_seq_len": 64, "model.n_layers": 2})
    Trainer(cfg, log=lambda *_: None).train()
    return run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    return train_tiny_run(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def exported(tiny_run, tmp_path_factory) -> Path:
    from competesmoe.train.export import export
    return export(tiny_run, tmp_path_factory.mktemp("hf") / "model", log=lambda *_: None)


def small_model(router: str = "smoe") -> MoETransformer:
    moe = MoEConfig(d_model=32, d_expert=16, n_experts=4, top_k=2, router=router,
                    router_opts=RouterConfig(n_shared=1) if router.startswith("sharede") else RouterConfig())
    torch.manual_seed(0)
    return MoETransformer(ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=2, max_seq_len=32, moe=moe)).eval()


@pytest.mark.parametrize("router", ["smoe", "sharede_v3"])
def test_save_pretrained_round_trip_gives_identical_logits(tmp_path, router):
    model = small_model(router)
    for buf in model.buffers():  # persistent router state (expert_bias) must survive
        buf.uniform_()
    hf = CompeteSMoEForCausalLM.from_transformer(model, eos_token_id=0)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    loaded = CompeteSMoEForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.model.head.weight is loaded.model.embed.weight  # tied after loading
    ids = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    for name, buf in loaded.named_buffers():
        assert torch.isfinite(buf).all(), name


def test_labels_give_the_shifted_lm_loss_plus_the_moe_aux_loss():
    model = small_model()
    hf = CompeteSMoEForCausalLM.from_transformer(model)
    ids = torch.randint(0, 64, (2, 9))
    out = hf(ids, labels=ids)
    lm = model(ids[:, :-1], targets=ids[:, 1:]).lm_loss
    aux = model(ids).aux_loss
    assert aux > 0  # the entropy/switch balance term is there
    torch.testing.assert_close(out.aux_loss, aux)
    torch.testing.assert_close(out.loss, lm + aux)
    torch.testing.assert_close(hf(ids, labels=ids, include_aux_loss=False).loss, lm)
    hf.config.include_aux_loss = False
    torch.testing.assert_close(hf(ids, labels=ids).loss, lm)
    assert out.logits.shape == (2, 9, 64)


def test_hf_training_step_competes_and_its_loss_carries_distillation():
    """Through the HF wrapper (as transformers' Trainer calls it) a competition step's loss holds γ·L_D + β·L_div."""
    from competesmoe import CompetitionSchedule, attach_schedule
    model = small_model("competesmoe").train()
    hf = CompeteSMoEForCausalLM.from_transformer(model).train()
    attach_schedule(hf, CompetitionSchedule(n_layers=2, total_steps=1, omega=1.0, a_max=2))
    ids = torch.randint(0, 64, (2, 9))
    out = hf(ids, labels=ids)
    out.loss.backward()
    gate = hf.model.blocks[0].moe.router.gate.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0  # only the distillation/balance terms reach it
    hf.zero_grad()
    hf(ids, labels=ids, include_aux_loss=False).loss.backward()
    assert gate.grad is None or gate.grad.abs().sum() == 0  # competing layers: no task gradient to the router


def test_register_is_idempotent_and_config_is_derived():
    register()
    register()
    cfg = CompeteSMoEConfig(model_config=small_model().cfg.to_dict())
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("competesmoe", 2, 32, 64)
    assert cfg.to_model_config() == small_model().cfg


def test_padded_attention_mask_is_refused():
    hf = CompeteSMoEForCausalLM.from_transformer(small_model())
    with pytest.raises(ValueError, match="padding"):
        hf(torch.ones(2, 4, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]))


def test_generate_with_and_without_cache_equals_our_generate():
    model = small_model()
    hf = CompeteSMoEForCausalLM.from_transformer(model, eos_token_id=None)
    ids = torch.randint(1, 64, (2, 6))
    calls: list[int] = []
    hook = hf.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape[1]), with_kwargs=True)
    cached = hf.generate(ids, max_new_tokens=7, do_sample=False, use_cache=True, pad_token_id=0)
    hook.remove()
    assert calls == [6] + [1] * 6  # the cache was used: one new token per step
    plain = hf.generate(ids, max_new_tokens=7, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, plain)
    assert torch.equal(cached, model.generate(ids, 7))


def test_export_folder_loads_with_auto_classes(tiny_run, exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from competesmoe.train import load_trained
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (exported / name).is_file(), name
    model, _, tok = load_trained(tiny_run, log=lambda *_: None)
    hf = AutoModelForCausalLM.from_pretrained(exported).eval()
    hf_tok = AutoTokenizer.from_pretrained(exported)
    assert isinstance(hf, CompeteSMoEForCausalLM)
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.eos_token_id == tok.token_to_id("<|endoftext|>")
    text = "The quick brown fox, said he."
    assert hf_tok(text)["input_ids"] == tok.encode(text).ids
    ids = torch.tensor([tok.encode(text).ids])
    # Same parameters, but not the same code path bit for bit (transformers' loading may change how a
    # matmul is laid out): fp32 rounding, 1e-5 absolute on logits of magnitude ~10.
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(hf.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=None,
                                   pad_token_id=hf_tok.pad_token_id), model.generate(ids, 5))


def test_loaded_model_is_aligned_and_takes_the_grouped_mm_path(exported, monkeypatch):
    """Weights memory-mapped from safetensors start at an arbitrary offset; loading realigns them."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(exported).eval()
    assert all(p.data_ptr() % 16 == 0 for p in hf.parameters())
    assert hf.model.head.weight is hf.model.embed.weight
    from competesmoe.moe.experts import Experts
    experts = [m for m in hf.modules() if isinstance(m, Experts)]
    for m in experts:
        m.backend = "grouped_mm"   # refuses misaligned weights (auto on CPU would take the loop anyway)
    calls = []
    real = F.grouped_mm
    monkeypatch.setattr(F, "grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        hf(torch.ones(1, 8, dtype=torch.long))
    assert len(experts) == hf.config.num_hidden_layers
    assert len(calls) == 2 * hf.config.num_hidden_layers  # two grouped GEMMs per MoE layer


def test_realign_parameters_copies_only_misaligned_storage():
    from competesmoe.model.hf import realign_parameters
    lin = torch.nn.Linear(4, 4, bias=False)
    storage = torch.zeros(17)
    lin.weight.data = storage[1:].view(4, 4)  # 4-byte offset
    assert lin.weight.data_ptr() % 16 != 0
    assert realign_parameters(lin) == 1 and lin.weight.data_ptr() % 16 == 0
    assert realign_parameters(lin) == 0


def test_export_cli_errors(tmp_path, exported, capsys):
    from competesmoe.cli import main
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "out")]) == 1
    assert "no such checkpoint" in capsys.readouterr().err   # the dispatcher's one line on stderr
    assert main(["export", str(tmp_path), str(exported)]) == 1  # not empty
    assert "not empty" in capsys.readouterr().err


def test_save_hf_needs_an_eos_token(tmp_path):
    from tokenizers import Tokenizer, models
    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="endoftext"):
        save_hf(small_model(), tok, tmp_path)
