"""`analyze` and `eval` on every model the project writes besides pre-training runs: a `competesmoe finetune`
run of a Hugging Face model (its checkpoints), and an upcycled Hugging Face folder.

The references are independent of the analysis code: the model reloaded with `from_pretrained`, its
logits' cross-entropy by hand, and routing indices read by a hook.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from competesmoe import moe_layers
from competesmoe.cli import main as cli_main
from competesmoe.analysis.analyze import analyze_checkpoints, checkpoint_paths, run_token_set
from competesmoe.eval.loading import load_any
from competesmoe.model.upcycle import upcycle
from competesmoe.train.finetune import finetune, finetune_preset
from competesmoe.train.loading import load_dense_hf
from test_eval_cli import data_dir  # noqa: F401  (tiny benchmark files)
from test_finetune import corpus, llama_folder  # noqa: F401  (a tiny Llama folder with a chat tokenizer, texts)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ft_run(llama_folder, corpus, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("ft") / "run"
    cfg = finetune_preset("vit", {
        "model.init": str(llama_folder), "data.train": str(corpus / "train.jsonl"), "data.seq_len": 32,
        "data.valid_fraction": 0.1, "train.out_dir": str(out), "train.steps": 4, "train.batch_size": 4,
        "train.grad_accum": 1, "train.lr": 3e-3, "train.warmup_steps": 1, "train.eval_every": 4,
        "train.eval_batches": 1, "train.ckpt_every": 2, "train.keep_last": 10, "train.precision": "fp32",
        "train.tensorboard": False, "train.schedule.omega": 0.5, "train.schedule.a_max": 2,
        "train.schedule.warmup": 0.0})
    finetune(cfg, log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def upcycled_folder(llama_folder, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("up") / "moe"
    model = upcycle(load_dense_hf(llama_folder), router="competesmoe")
    model.save_pretrained(out)
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(llama_folder).save_pretrained(out)
    return out


def _by_hand(folder, seqs_BS1):
    """Mean next-token cross-entropy (float64) and each MoE layer's routing indices of the model loaded
    with `from_pretrained`; ~id tokens (chat masks) are no target."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    idx = [[] for _ in moe_layers(model)]
    hooks = [l.register_forward_hook(lambda m, a, o, i=i: idx[i].append(o.indices)) for i, l in enumerate(moe_layers(model))]
    nll, n = 0.0, 0
    with torch.no_grad():
        for seq in seqs_BS1.split(16):
            x, y = seq[:, :-1], seq[:, 1:]
            x = torch.where(x < 0, ~x, x)
            logits = model(input_ids=x).logits.double()
            keep = y >= 0
            nll += float(torch.nn.functional.cross_entropy(logits[keep], y[keep], reduction="sum"))
            n += int(keep.sum())
    for h in hooks:
        h.remove()
    return nll / n, [torch.cat(i) for i in idx]


def test_finetune_run_loads_from_its_checkpoints(ft_run):
    paths = checkpoint_paths([ft_run])
    assert [p.name for p in paths] == ["step_00000002", "step_00000004"]
    last = load_any(paths[-1], log=lambda *_: None)
    assert last.kind == "finetune" and last.seq_len == 32 and len(moe_layers(last.model)) == 2
    back = AutoModelForCausalLM.from_pretrained(ft_run / "hf")      # the final model == the last checkpoint
    sd = back.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in last.model.hf.state_dict().items())
    first = load_any(paths[0], log=lambda *_: None)
    assert not torch.equal(moe_layers(first.model)[0].router.gate.weight, moe_layers(last.model)[0].router.gate.weight)
    # a run still training has no RUN/hf: the architecture comes from model.init (dense: upcycled again)
    (ft_run / "hf").rename(ft_run / "hf-aside")
    try:
        mid = load_any(paths[0], log=lambda *_: None)
    finally:
        (ft_run / "hf-aside").rename(ft_run / "hf")
    a, b = first.model.state_dict(), mid.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_analyze_finetune_run(ft_run, tmp_path):
    out = tmp_path / "report"
    assert cli_main(["analyze", str(ft_run), "--tokens", "64", "--out", str(out)]) == 0
    report = json.loads((out / "analysis.json").read_text())
    assert report["steps"] == [2, 4] and len(report["ecr"]) == 1 and report["router"] == "competesmoe"
    assert (report["n_experts"], report["top_k"], report["n_layers"]) == (4, 2, 2)
    seqs = run_token_set(ft_run / "checkpoints" / "step_00000004", 64, log=lambda *_: None)
    loss, idx = _by_hand(ft_run / "hf", seqs)
    agree = report["agreement"][-1]
    assert agree["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert report["final"]["shift"]["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    N, K = 4, 2
    for row, i in zip(report["final"]["load"], idx):
        flat = i.flatten().tolist()
        assert row == pytest.approx([flat.count(e) / (len(i) * K) for e in range(N)])
    assert 0 <= report["ecr"][0]["ecr"] <= 1
    assert report["final"]["shift"]["shifted_ppl"] != pytest.approx(report["final"]["shift"]["ppl"], rel=1e-6)


def test_analyze_upcycled_folder_needs_a_text(upcycled_folder, corpus, tmp_path, capsys):  # noqa: F811
    assert cli_main(["analyze", str(upcycled_folder), "--out", str(tmp_path / "x")]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]   # after transformers' loading bar
    assert line.startswith("error: ") and "no validation split" in line and "--data" in line
    out = tmp_path / "report"
    assert cli_main(["analyze", str(upcycled_folder), "--data", str(corpus / "valid.jsonl"), "--tokens", "96",
                     "--seq-len", "24", "--out", str(out)]) == 0
    report = json.loads((out / "analysis.json").read_text())
    assert report["steps"] == [-1] and report["ecr"] == [] and report["tokens"] == 96
    seqs = run_token_set(upcycled_folder, 96, str(corpus / "valid.jsonl"), log=lambda *_: None, seq_len=24)
    loss, _ = _by_hand(upcycled_folder, seqs)
    assert report["final"]["shift"]["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    # step 0: every expert is the dense MLP, so any K of them (ranks 2..K+1 too) give the same output
    assert report["final"]["shift"]["shifted_ppl"] == pytest.approx(report["final"]["shift"]["ppl"], rel=1e-6)


def test_eval_finetune_run_and_upcycled_folder(ft_run, upcycled_folder, data_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "eval"
    rc = cli_main(["eval", str(ft_run), str(upcycled_folder), "--tasks", "lambada,piqa,valid_ppl",
                   "--data-dir", str(data_dir), "--out", str(out), "--device", "cpu", "--no-progress",
                   "--names", "ft,up", "--batch-size", "4"])
    err = capsys.readouterr().err
    assert rc == 0, err
    runs = json.loads((out / "results.json").read_text())
    assert set(runs[0]["tasks"]) == {"lambada", "piqa", "valid_ppl"}
    assert set(runs[1]["tasks"]) == {"lambada", "piqa"} and "skipping valid_ppl" in err
    # valid_ppl of the fine-tuning run by hand: the run's held-out split through the final model
    loaded = load_any(ft_run, log=lambda *_: None)
    from competesmoe.data.batches import packed
    seqs = packed(loaded.valid_tokens(), 32)
    loss, _ = _by_hand(ft_run / "hf", seqs)
    assert runs[0]["tasks"]["valid_ppl"]["ppl"] == pytest.approx(math.exp(loss), rel=1e-4)


def test_finetune_keeps_the_targets_of_an_upcycled_vlm(corpus, tmp_path):  # noqa: F811
    """A LLaVA upcycled with targets=language and fine-tuned (text) is saved with targets=language, so
    it reloads with the same structure (not the VLM default vision,connector)."""
    import transformers
    from transformers import AutoModelForImageTextToText
    from test_finetune import chat_tokenizer
    tok = chat_tokenizer()
    text = transformers.LlamaConfig(vocab_size=len(tok) + 1, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    vision = transformers.SiglipVisionConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=1,
                                             num_attention_heads=4, image_size=30, patch_size=6)
    vlm = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=len(tok), vision_feature_select_strategy="full"))
    upcycle(vlm, targets="language").save_pretrained(tmp_path / "moe")
    tok.save_pretrained(tmp_path / "moe")
    cfg = finetune_preset("vit", {
        "model.init": str(tmp_path / "moe"), "data.train": str(corpus / "train.jsonl"), "data.seq_len": 32,
        "data.valid_fraction": 0.1, "train.out_dir": str(tmp_path / "run"), "train.steps": 1, "train.batch_size": 2,
        "train.grad_accum": 1, "train.eval_every": 1, "train.eval_batches": 1, "train.ckpt_every": 1,
        "train.precision": "fp32", "train.tensorboard": False, "train.warmup_steps": 0})
    finetune(cfg, log=lambda *_: None)
    saved = json.loads((tmp_path / "run" / "hf" / "config.json").read_text())
    assert saved["competesmoe"]["upcycle"]["targets"] == "language"
    back = AutoModelForImageTextToText.from_pretrained(tmp_path / "run" / "hf")
    assert len(moe_layers(back)) == 2 and not moe_layers(back.model.vision_tower)
