"""Fine-tuning upcycled models: chat masking token by token, `competesmoe finetune` on Hugging Face and
competesmoe models (competition steps run, the loss falls, resume is exact), transformers' Trainer with
the competition callback, and the clear errors."""
from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

import competesmoe  # noqa: F401
from competesmoe import moe_layers
from competesmoe.cli import main as cli_main
from competesmoe.config import ConfigError, ScheduleConfig
from competesmoe.data import DataConfig, DataError
from competesmoe.data.chat import encode_chat, lm_pair, load_finetune_data, pack
from competesmoe.data.tokenizer import train_bpe
from competesmoe.model.hf import hf_tokenizer
from competesmoe.model.upcycle import upcycle
from competesmoe.train import checkpoint as ckpt
from competesmoe.train.finetune import finetune, finetune_preset

hf_logging.set_verbosity_error()

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest)
V = 320
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
WORDS = "the cat sat on a mat while dogs ran in parks and birds sang over green hills near old towns".split()


def text(seed: int, n: int = 60) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=g).tolist())


def chat_tokenizer():
    tok = hf_tokenizer(train_bpe([text(i) for i in range(20)], 300))
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]})
    tok.chat_template = TEMPLATE
    return tok


def hf_folder(tmp_path_factory, family: str):
    folder = tmp_path_factory.mktemp(family)
    torch.manual_seed(3)
    cfg = (transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
           if family == "llama" else  # GPT-2: tied embeddings, stored once in checkpoints
           transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    chat_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return hf_folder(tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    (d / "train.jsonl").write_text("".join(json.dumps({"text": text(i, 200)}) + "\n" for i in range(30)))
    (d / "valid.jsonl").write_text("".join(json.dumps({"text": text(100 + i, 200)}) + "\n" for i in range(3)))
    chats = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": text(i, 8)},
                           {"role": "assistant", "content": text(50 + i, 6)}, {"role": "user", "content": text(80 + i, 5)},
                           {"role": "assistant", "content": text(90 + i, 7)}]} for i in range(40)]
    (d / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    return d


# --- chat data -----------------------------------------------------------------------------------
def test_chat_masking_token_by_token():
    tok = chat_tokenizer()
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat sat"},
            {"role": "assistant", "content": "on a mat"}, {"role": "user", "content": "and dogs"},
            {"role": "assistant", "content": "ran in parks"}]
    ids, mask = encode_chat(tok, msgs)
    # independent reference: each message is <|role|> content <|end|>; targets = a reply's content + <|end|>
    exp_ids, exp_mask = [], []
    for m in msgs:
        body = tok(m["content"], add_special_tokens=False).input_ids + [tok.convert_tokens_to_ids("<|end|>")]
        exp_ids += [tok.convert_tokens_to_ids(f"<|{m['role']}|>")] + body
        exp_mask += [False] + [m["role"] == "assistant"] * len(body)
    assert ids == exp_ids and mask == exp_mask
    stream = pack([(ids, mask)], tok.eos_token_id, eos_target=False)
    x, y = lm_pair(torch.from_numpy(stream)[None])
    assert x[0].tolist() == (ids + [tok.eos_token_id])[:-1]
    for t in range(len(ids)):   # target of position t is token t+1, kept only if that token is a reply token
        want = ids[t + 1] if t + 1 < len(ids) and mask[t + 1] else -100
        assert y[0, t].item() == want, t


def test_chat_errors(tmp_path):
    tok = chat_tokenizer()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl: line 1: no assistant message"):
        load_finetune_data(DataConfig(train=str(bad), valid=str(bad)), tok, chat=True)
    bad.write_text('{"messages": [{"role": "user"}]}\n')
    with pytest.raises(DataError, match="message 0 needs string 'role' and 'content'"):
        load_finetune_data(DataConfig(train=str(bad), valid=str(bad)), tok, chat=True)
    plain = hf_tokenizer(train_bpe([text(1)], 280))
    with pytest.raises(DataError, match="no chat template"):
        encode_chat(plain, [{"role": "assistant", "content": "x"}])


def test_text_data_targets_everything(corpus):
    tok = chat_tokenizer()
    data = load_finetune_data(DataConfig(train=str(corpus / "train.jsonl"), valid=str(corpus / "valid.jsonl"),
                                         seq_len=32), tok)
    assert (data.train >= 0).all() and data.valid is not None
    x, y = lm_pair(next(data.train_batches(4)))
    assert x.shape == y.shape == (4, 32) and (y != -100).all()


# --- competesmoe finetune ------------------------------------------------------------------------
def small_run(tmp_path, init, data, **extra):
    over = {"model.init": str(init), "data.train": str(data), "data.seq_len": 32, "data.valid_fraction": 0.1,
            "train.out_dir": str(tmp_path / "run"), "train.steps": 12, "train.batch_size": 4, "train.grad_accum": 1, "train.lr": 3e-3,
            "train.warmup_steps": 2, "train.eval_every": 12, "train.eval_batches": 2, "train.ckpt_every": 6,
            "train.log_every": 1, "train.precision": "fp32", "train.tensorboard": False,
            "train.schedule.omega": 0.5, "train.schedule.a_max": 2, "train.schedule.warmup": 0.0, **extra}
    return finetune_preset("vit", over)


def rows(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def initial_val_loss(cfg):
    from competesmoe.train.finetune import build
    _, model, data, _ = build(cfg, log=lambda *_: None)
    model.eval()
    with torch.no_grad():
        losses = [model(*lm_pair(b)).lm_loss for b in data.valid_batches(4, 2)]
    return float(torch.stack(losses).mean())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_finetune_hf_competes_lowers_loss_and_resumes_exactly(family, llama_folder, corpus, tmp_path,
                                                             tmp_path_factory):
    folder = llama_folder if family == "llama" else hf_folder(tmp_path_factory, family)
    cfg = small_run(tmp_path, folder, corpus / "train.jsonl")
    before = initial_val_loss(cfg)
    summary = finetune(cfg, log=lambda *_: None)
    run = tmp_path / "run"
    r = rows(run)
    assert sum(x.get("competing_layers", 0) for x in r) > 0        # competition steps ran
    assert summary["val_loss"] < before - 0.1, (before, summary["val_loss"])
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["init"] == str(folder) and saved["model"]["router"] == "competesmoe"
    back = AutoModelForCausalLM.from_pretrained(run / "hf")         # the final model, as a HF folder
    assert type(back).__name__.startswith("Upcycled") and len(moe_layers(back)) == 2
    final = load_file(str(ckpt.checkpoints(run / "checkpoints")[-1] / "model.safetensors"))
    # resume: drop the last checkpoint and continue from step 6 -> bit-identical weights at step 12
    import shutil
    shutil.rmtree(ckpt.checkpoints(run / "checkpoints")[-1])
    finetune(cfg, resume=True, log=lambda *_: None)
    again = load_file(str(ckpt.checkpoints(run / "checkpoints")[-1] / "model.safetensors"))
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)


def test_finetune_chat_and_cli(llama_folder, corpus, tmp_path, capsys):
    rc = cli_main(["finetune", str(llama_folder), "--data", str(corpus / "chat.jsonl"), "--chat", "--router", "smoe",
                   "--out", str(tmp_path / "chat"), "--steps", "3", "--precision", "bf16",
                   "--set", "data.seq_len=32", "--set", "train.batch_size=2", "--set", "train.grad_accum=1", "--set", "train.eval_every=3",
                   "--set", "train.eval_batches=1", "--set", "train.tensorboard=false", "--set", "train.lr=1e-3"])
    assert rc == 0, capsys.readouterr().err
    assert "Hugging Face model:" in capsys.readouterr().out
    # an upcycled folder keeps its structure; asking for another router is a clear error
    rc = cli_main(["finetune", str(tmp_path / "chat" / "hf"), "--data", str(corpus / "train.jsonl"),
                   "--router", "xmoe", "--out", str(tmp_path / "again")])
    assert rc == 1 and "already upcycled with router 'smoe' (asked 'xmoe')" in capsys.readouterr().err
    # ... while its competition and loss settings follow the fine-tuning config, and are saved with it
    rc = cli_main(["finetune", str(tmp_path / "chat" / "hf"), "--data", str(corpus / "train.jsonl"),
                   "--out", str(tmp_path / "again"), "--steps", "1", "--set", "data.seq_len=32",
                   "--set", "train.batch_size=2", "--set", "train.grad_accum=1", "--set", "train.eval_batches=1",
                   "--set", "train.tensorboard=false", "--set", "kappa=silu", "--set", "model.losses.zloss_coef=0.0"])
    assert rc == 0, capsys.readouterr().err
    layer = moe_layers(AutoModelForCausalLM.from_pretrained(tmp_path / "again" / "hf"))[0]
    assert (layer.cfg.router, layer.cfg.competition.kappa, layer.cfg.losses.zloss_coef) == ("smoe", "silu", 0.0)


def test_finetune_competesmoe_dense_model_is_a_train_run(corpus, tmp_path):
    from competesmoe.config import MoEConfig
    from competesmoe.model.hf import save_hf
    from competesmoe.model.transformer import ModelConfig, MoETransformer
    from competesmoe.train import load_trained
    tok = train_bpe([text(i) for i in range(20)], 300)
    dense = MoETransformer(ModelConfig(vocab_size=tok.get_vocab_size(), n_layers=2, d_model=32, n_heads=4,
                                       max_seq_len=64, dense=True,
                                       moe=MoEConfig(d_model=32, d_expert=16, n_experts=8, top_k=2, activation="relu")))
    src = save_hf(dense, tok, tmp_path / "dense")
    cfg = small_run(tmp_path, src, corpus / "train.jsonl", **{"train.steps": 6, "train.eval_every": 6,
                                                             "data.cache_dir": str(tmp_path / "cache"),
                                                             "data.progress": False})
    finetune(cfg, log=lambda *_: None)
    model, run_cfg, _ = load_trained(tmp_path / "run", log=lambda *_: None)    # readable by eval/analyze
    assert run_cfg.model.moe.n_experts == 4 and run_cfg.model.moe.d_expert == 32 and not run_cfg.model.dense
    assert any(r.get("competing_layers", 0) for r in rows(tmp_path / "run"))
    assert (tmp_path / "run" / "hf" / "config.json").is_file()
    # model.upcycle=false: the dense model trained as it is (a "dense continued" baseline)
    cfg = small_run(tmp_path, src, corpus / "train.jsonl", **{"train.steps": 3, "train.eval_every": 3,
                                                             "train.out_dir": str(tmp_path / "dense-run"),
                                                             "model.upcycle": False,
                                                             "data.cache_dir": str(tmp_path / "cache"),
                                                             "data.progress": False})
    summary = finetune(cfg, log=lambda *_: None)
    model, run_cfg, _ = load_trained(tmp_path / "dense-run", log=lambda *_: None)
    assert run_cfg.model.dense and summary["step"] == 3 and math.isfinite(summary["val_loss"])
    assert [l.cfg.n_experts for l in moe_layers(model)] == [1, 1]        # a dense block: its FFN as one expert
    assert all(r.get("competing_layers", 0) == 0 for r in rows(tmp_path / "dense-run"))


def test_finetune_errors(llama_folder, corpus, tmp_path):
    with pytest.raises(ConfigError, match="finetune needs data"):
        finetune(finetune_preset("vit", {"model.init": str(llama_folder), "train.out_dir": str(tmp_path / "x")}))
    plain = tmp_path / "plain"
    AutoModelForCausalLM.from_pretrained(llama_folder).save_pretrained(plain)
    hf_tokenizer(train_bpe([text(1)], 280)).save_pretrained(plain)
    with pytest.raises(DataError, match="no chat template"):
        finetune(small_run(tmp_path, plain, corpus / "chat.jsonl", chat=True), log=lambda *_: None)


def test_finetune_resume_reads_its_finetune_yaml_and_trains_longer(llama_folder, corpus, tmp_path, capsys):
    run = str(tmp_path / "run")
    sets = ["data.seq_len=32", "train.batch_size=2", "train.grad_accum=1", "train.eval_every=3", "train.ckpt_every=3",
            "train.eval_batches=1", "train.tensorboard=false", "train.lr=1e-3", "omega=0.5", "a_max=1"]
    flags = [a for s in sets for a in ("--set", s)]
    assert cli_main(["finetune", str(llama_folder), "--data", str(corpus / "train.jsonl"), "--out", run,
                     "--steps", "3", *flags]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert cli_main(["finetune", "--out", run, "--resume", "--steps", "5"]) == 0, capsys.readouterr().err   # no INIT, no --data
    out = capsys.readouterr().out
    assert "resumed from" in out and "train.steps 3 -> 5" in out and "after 5 steps" in out
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["step"] == 5
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf") is not None
    assert cli_main(["finetune", "--out", run, "--resume", "--set", "train.lr=0.1"]) == 1
    assert "train.lr: checkpoint 0.001 vs now 0.1" in capsys.readouterr().err
    assert cli_main(["finetune", "--out", str(tmp_path / "nothing"), "--resume"]) == 1
    assert "finetune needs INIT and --data" in capsys.readouterr().err


def test_backend_applies_when_fine_tuning_an_upcycled_folder(llama_folder, tmp_path):
    import argparse
    from competesmoe.train.finetune import build
    from competesmoe.train.finetune_cli import add_arguments, build_config
    up = tmp_path / "up"
    upcycle(AutoModelForCausalLM.from_pretrained(llama_folder), router="competesmoe").save_pretrained(up)
    chat_tokenizer().save_pretrained(up)
    p = argparse.ArgumentParser()
    add_arguments(p)
    (tmp_path / "t.txt").write_text(text(1, 400))
    for backend in (None, "loop", "grouped_mm"):   # None: the folder's own setting ("auto")
        argv = [str(up), "--data", str(tmp_path / "t.txt"), "--out", str(tmp_path / "run"), "--set", "data.seq_len=16"]
        cfg = build_config(p.parse_args(argv + (["--set", f"model.backend={backend}"] if backend else [])))
        _, model, _, _ = build(cfg, log=lambda *_: None)
        layers = moe_layers(model)
        assert len(layers) == 2 and all(l.experts.backend == l.cfg.backend == (backend or "auto") for l in layers)
        if backend:   # the dispatch the layers will run is the one asked for
            assert all(l.experts.path(torch.device("cpu"), torch.float32, 64) == backend for l in layers)


def test_layer_units_are_the_decoder_and_vision_encoder_layers():
    """FSDP2 and activation checkpointing work per layer: a VLM's decoder layers and vision-encoder layers."""
    from competesmoe.train.distributed import layer_units
    from competesmoe.train.finetune import HFCausalLM
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                             num_attention_heads=2, image_size=16, patch_size=8)
    text_cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)
    vlm = transformers.AutoModelForImageTextToText.from_config(
        transformers.LlavaConfig(vision_config=vision, text_config=text_cfg, image_token_id=V - 1))
    units = layer_units(HFCausalLM(vlm))
    assert units == list(vlm.model.language_model.layers) + list(vlm.model.vision_tower.encoder.layers)
    llama = AutoModelForCausalLM.from_config(text_cfg)
    assert layer_units(HFCausalLM(llama)) == list(llama.model.layers)


def test_one_expert_is_not_an_moe(llama_folder, corpus, tmp_path, capsys):
    for argv in (["finetune", str(llama_folder), "--data", str(corpus / "train.jsonl"), "--out", str(tmp_path / "x")],
                 ["upcycle", str(llama_folder), str(tmp_path / "x")]):
        assert cli_main(argv + ["--experts", "1"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "experts must be an integer >= 2 (an MoE), got 1" in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


# --- transformers' Trainer ---------------------------------------------------------------------------
def test_transformers_trainer_with_competition_callback(llama_folder, tmp_path):
    from competesmoe.train.hf_callback import CompetitionCallback
    model = upcycle(AutoModelForCausalLM.from_pretrained(llama_folder), router="competesmoe")
    seen = []   # (optimizer step, layer, competed) for every forward
    callback = CompetitionCallback(ScheduleConfig(omega=0.5, a_max=1, warmup=0.0, seed=3))
    for i, layer in enumerate(moe_layers(model)):
        layer.register_forward_hook(lambda m, a, out, i=i: seen.append((callback.schedule.step, i, out.competed)))
    x = torch.randint(0, V, (16, 16), generator=torch.Generator().manual_seed(0))
    ds = [{"input_ids": r, "labels": r} for r in x]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2,
                                          gradient_accumulation_steps=2, learning_rate=1e-3, report_to=[],
                                          logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=[callback])
    trainer.train()
    sched = callback.schedule
    assert sched.step == 4                                        # once per optimizer step, not per micro-batch
    assert len(seen) == 4 * 2 * 2                                 # steps x micro-batches x layers
    assert all(competed == sched.competes(layer, step) for step, layer, competed in seen)
    assert any(c for *_, c in seen) and not all(c for *_, c in seen)
    assert all("loss" in h for h in trainer.state.log_history[:4])
