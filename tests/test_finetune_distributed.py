"""`torchrun ... -m competesmoe finetune` on 2 CPU processes (gloo): DDP, FSDP2 and expert parallelism.

Each run fine-tunes a tiny upcycled Llama (FSDP2 with activation checkpointing) and must match one process with the same global batch (losses
to rounding, as in test_distributed.py), write its files once (rank 0), end with an hf/ folder holding the
full weights (experts [N, ...], not a rank's slice) that `from_pretrained` loads in one process with the
logits of the trained weights, and leave checkpoints that resume on another number of processes.
Errors under torchrun are one line from rank 0 and exit 1 on every rank.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import competesmoe  # noqa: F401  (registers the upcycled model type)
from competesmoe import moe_layers
from competesmoe.train import checkpoint as ckpt
from competesmoe.train.finetune import finetune, finetune_preset

from test_finetune import V, chat_tokenizer, text

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS, CKPT = 8, 4
SETS = {"data.seq_len": 32, "data.valid_fraction": 0.1, "train.batch_size": 4, "train.grad_accum": 2,
        "train.lr": 3e-3, "train.warmup_steps": 2, "train.eval_every": CKPT, "train.eval_batches": 2,
        "train.ckpt_every": CKPT, "train.keep_last": 10, "train.log_every": 1, "train.precision": "fp32",
        "train.tensorboard": False, "omega": 0.5, "a_max": 2, "train.schedule.warmup": 0.0,
        "model.losses.balance": "entropy"}
# The `switch` balance loss of the fine-tuning preset is a per-micro-batch statistic (each rank's own, so not
# the one-process value; docs/distributed.md, Limits): the per-sequence `entropy` balance loss makes the
# 2-process loss the one-process loss exactly, up to rounding.
# float32, 8 AdamW steps, two reduction orders: the tolerance of test_distributed.py, for the same reason.
ATOL = 2e-5


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("ftdist")
    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d / "llama")
    chat_tokenizer().save_pretrained(d / "llama")
    (d / "train.jsonl").write_text("".join(json.dumps({"text": text(i, 200)}) + "\n" for i in range(30)))
    return d


def args(src: Path, out: Path, extra=(), resume=False) -> list[str]:
    sets = {**SETS, **dict(e.split("=", 1) for e in extra)}
    return (["finetune", str(src / "llama"), "--data", str(src / "train.jsonl"), "--out", str(out),
             "--steps", str(STEPS)] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
            + (["--resume"] if resume else []))


def torchrun(cli_args: list[str], nproc: int = 2, ok: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "competesmoe", *cli_args]
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
                         capture_output=True, text=True, timeout=300)
    if ok:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def one_process(src: Path, out: Path, *extra, resume=False) -> dict:
    sets = {**SETS, **dict(e.split("=", 1) for e in extra)}
    cfg = finetune_preset("vit", {"model.init": str(src / "llama"), "data.train": str(src / "train.jsonl"),
                                  "train.out_dir": str(out), "train.steps": STEPS, **sets})
    return finetune(cfg, resume=resume, log=lambda *_: None)


@pytest.fixture(scope="module")
def runs(src):
    one_process(src, src / "one")
    logs = {name: torchrun(args(src, src / name, extra)) for name, extra in
            {"ddp": [], "fsdp": ["train.parallel=fsdp", "train.activation_checkpointing=true"],
             "ep": ["train.expert_parallel=2"]}.items()}
    return src, logs


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def checkpoint_weights(run: Path, step: int | None = None) -> dict[str, torch.Tensor]:
    paths = ckpt.checkpoints(run / "checkpoints")
    path = paths[-1] if step is None else next(p for p in paths if ckpt.step_of(p) == step)
    return ckpt.full_model_tensors(path) if ckpt.is_sharded(path) else load_file(str(path / "model.safetensors"))


def logits(model: torch.nn.Module) -> torch.Tensor:
    x = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(x).logits


def assert_same_losses(a: Path, b: Path):
    la, lb = losses(a), losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
    for s in la:
        assert abs(la[s] - lb[s]) < ATOL, (s, la[s], lb[s])


def assert_complete_hf_folder(run: Path, ref: Path):
    """hf/ holds every weight of the trained model, whole; it loads in one process and gives the logits of the
    final checkpoint's weights (and, to rounding, those of the one-process run)."""
    hf = load_file(str(run / "hf" / "model.safetensors"))
    trained = {k[len("hf."):]: v for k, v in checkpoint_weights(run).items()}
    assert hf.keys() == trained.keys() == load_file(str(ref / "hf" / "model.safetensors")).keys()
    for k in hf:
        assert torch.equal(hf[k], trained[k]), k
    assert hf["model.layers.0.mlp.moe.experts.w1"].shape[0] == 4           # all N experts, not one rank's 2
    back = AutoModelForCausalLM.from_pretrained(run / "hf")
    assert all(layer.experts.n_experts == 4 for layer in moe_layers(back))
    same = AutoModelForCausalLM.from_pretrained(ref / "hf")
    same.load_state_dict(trained)
    torch.testing.assert_close(logits(back), logits(same), rtol=0, atol=0)
    torch.testing.assert_close(logits(back), logits(AutoModelForCausalLM.from_pretrained(ref / "hf")),
                               rtol=0, atol=1e-4)   # 8 steps apart by rounding: weights within ATOL


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "ep"])
def test_torchrun_finetune_matches_one_process_and_writes_a_complete_hf_folder(runs, mode):
    src, logs = runs
    out = logs[mode].stdout + logs[mode].stderr
    assert out.count("final validation perplexity") == 1                   # rank 0 reports, once
    assert {"finetune.yaml", "summary.json", "hf", "config.yaml"} <= {p.name for p in (src / mode).iterdir()}
    assert not [p for p in (src / mode).iterdir() if p.name.startswith(".")]   # no temporary left behind
    if mode == "ep":
        assert "expert parallel: 2 ranks per group, 2 experts of each layer per rank" in out
    if mode == "fsdp":   # FSDP2 units and activation checkpointing per decoder layer, the same losses
        assert "activation checkpointing: 2 layers recompute their activations in backward" in out
        assert "distributed: 2 processes (gloo), fsdp (2 layer units + the root)" in out
    assert_same_losses(src / "one", src / mode)
    assert_complete_hf_folder(src / mode, src / "one")


def _truncate(src_run: Path, dst: Path, step: int) -> None:
    shutil.copytree(src_run, dst)
    shutil.rmtree(dst / "hf")
    for path in ckpt.checkpoints(dst / "checkpoints"):
        if ckpt.step_of(path) > step:
            shutil.rmtree(path)


def test_fsdp_checkpoint_holds_every_weight_and_resumes_on_one_process(runs):
    src, _ = runs
    sharded = checkpoint_weights(src / "fsdp", CKPT)
    single = checkpoint_weights(src / "one", CKPT)
    assert sharded.keys() == single.keys() and len(single) == 21
    _truncate(src / "fsdp", src / "fsdp-to-one", CKPT)
    one_process(src, src / "fsdp-to-one", "train.parallel=none", resume=True)
    assert_same_losses(src / "one", src / "fsdp-to-one")
    assert_complete_hf_folder(src / "fsdp-to-one", src / "one")


def test_one_process_checkpoint_resumes_on_two_ranks_with_fsdp_and_expert_parallelism(runs):
    src, _ = runs
    _truncate(src / "one", src / "one-to-two", CKPT)
    res = torchrun(args(src, src / "one-to-two", ["train.parallel=fsdp", "train.expert_parallel=2"], resume=True))
    assert "resumed from" in res.stdout + res.stderr
    assert_same_losses(src / "one", src / "one-to-two")
    assert_complete_hf_folder(src / "one-to-two", src / "one")


def test_torchrun_error_is_one_line_from_rank_0_and_writes_nothing(src):
    (src / "notmodel").mkdir(exist_ok=True)
    (src / "notmodel" / "notes.txt").write_text("not a model")
    bad = args(src, src / "bad", ["train.parallel=fsdp"])
    bad[1] = str(src / "notmodel")
    res = torchrun(bad, ok=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    lines = [l for l in out.splitlines() if "error: " in l and "notmodel" in l]
    assert lines == [f"error: {src / 'notmodel'}: not a model folder (no config.json) (expected a Hugging Face "
                     f"model folder or hub name, a competesmoe export, or a run/checkpoint folder)"], out[-3000:]
    assert not re.search(r'File ".*competesmoe[/\\\\][^"]*", line', out), out[-3000:]   # no worker traceback
    assert not (src / "bad").exists()


def test_a_rank_other_than_0_exits_1_silently(src, monkeypatch, capsys):
    from competesmoe.cli import main
    for rank, printed in (("1", ""), ("0", "error: ")):
        monkeypatch.setenv("RANK", rank)
        assert main(["finetune", str(src / "train.jsonl"), "--data", str(src / "train.jsonl"),
                     "--out", str(src / "bad-rank")]) == 1
        err = capsys.readouterr().err
        assert err.startswith(printed) and err.count("\n") == (1 if printed else 0), err
        with pytest.raises(SystemExit) as e:              # a bad flag: argparse's usage, from rank 0 only
            main(["finetune", "--bogus"])
        assert e.value.code == 2 and ("unrecognized arguments: --bogus" in capsys.readouterr().err) == (rank == "0")
    assert not (src / "bad-rank").exists()
