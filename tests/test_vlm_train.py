"""The three VLM stages (`competesmoe vlm`, presets of `competesmoe finetune` on the project's Trainer):
presets as Table 10, freezing by module group (frozen weights unchanged and absent from the optimizer), the
VIT stage upcycled and trained with the competition, a bit-exact resume, analysis and evaluation of its
checkpoints, and 2 gloo processes (FSDP2 per decoder and vision layer x expert parallelism = one process;
DDP with frozen groups). A tiny LLaVA (SigLIP + Llama) and a tiny processor, images from Pillow."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file
from transformers.utils import logging as hf_logging

import competesmoe  # noqa: F401
from competesmoe import moe_layers
from competesmoe.model.upcycle import freeze, param_groups
from competesmoe.train import checkpoint as ckpt
from competesmoe.train.finetune import FINETUNE_PRESETS, build, finetune, finetune_preset

hf_logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_thread")
WORDS = "what colour is the square circle triangle red green blue how many left of yes no two one".split()
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tiny_processor():
    from competesmoe.data.tokenizer import train_bpe
    from competesmoe.model.hf import hf_tokenizer
    tok = hf_tokenizer(train_bpe([" ".join(WORDS)] * 20, 200))
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]})
    tok.chat_template = TEMPLATE
    return transformers.LlavaProcessor(image_processor=transformers.SiglipImageProcessorPil(size={"height": 30, "width": 30}),
                                       tokenizer=tok, patch_size=6, vision_feature_select_strategy="full",
                                       chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def vlm_folder(tmp_path_factory):
    """A dense tiny LLaVA with its processor, and 12 samples of LLaVA-format data with images."""
    root = tmp_path_factory.mktemp("vlm")
    proc = tiny_processor()
    text = transformers.LlamaConfig(vocab_size=len(proc.tokenizer), hidden_size=32, intermediate_size=48,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=128)
    vision = transformers.SiglipVisionConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=30, patch_size=6)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=proc.image_token_id,
        vision_feature_select_strategy="full", vision_feature_layer=-1))
    model.save_pretrained(root / "dense")
    proc.save_pretrained(root / "dense")
    (root / "images").mkdir()
    rows, rng = [], np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        rows.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour is the square"}, {"from": "gpt", "value": WORDS[7 + i % 3]}]})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def load_vlm(folder):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    return AutoModelForImageTextToText.from_pretrained(folder), AutoProcessor.from_pretrained(folder)


def test_presets_are_table_10():
    pt, pft, vit = (FINETUNE_PRESETS[n] for n in ("vlm-pt", "vlm-pft", "vlm-vit"))
    assert (pt.train.lr, pt.train.batch_size, pt.train.grad_accum, pt.groups, pt.model.upcycle) == \
        (1e-3, 64, 4, ["connector"], False)
    assert (pft.train.lr, pft.train.batch_size, pft.groups, pft.model.upcycle) == \
        (2e-6, 6, ["vision", "connector", "language"], False)
    assert (vit.train.lr, vit.train.batch_size, vit.model.upcycle, vit.data.seq_len) == (4e-6, 5, True, 2048)
    assert all(c.llava and c.epochs == 1.0 and c.warmup_ratio == 0.03 and c.train.min_lr_ratio == 0.0
               and c.train.precision == "bf16" for c in (pt, pft, vit))
    m = vit.model
    assert (m.experts, m.top_k, m.targets, m.losses.balance_coef, m.losses.zloss_coef) == (4, 2, "vision,connector", 0.01, 0.001)
    s = vit.train.schedule
    assert (s.omega, s.a_max, s.warmup, s.seed) == (0.07, 9, 0.05, 42)
    with pytest.raises(Exception, match="trainable must be"):
        finetune_preset("vlm-pt", {"trainable": "vision,head"})
    with pytest.raises(Exception, match="two data formats"):
        finetune_preset("vlm-pt", {"chat": True})
    cfg = finetune_preset("vlm-vit")              # one epoch of 665,298 samples (LLaVA-665K) at 5 x 4 per step
    cfg.fit_to_data(665_298)
    assert (cfg.train.steps, cfg.train.warmup_steps) == (33_265, 998)


def small(name, folder, out, **extra):
    """A stage on the fixture's data, sized for a CPU test (fp32, 2 samples x 2 accumulation steps)."""
    return finetune_preset(name, {"model.init": str(folder / "dense"), "data.train": str(folder / "data.jsonl"),
                                  "images": str(folder / "images"), "train.out_dir": str(out), "data.seq_len": 128,
                                  "data.valid_fraction": 0.2, "train.batch_size": 2, "train.grad_accum": 2,
                                  "train.precision": "fp32", "train.eval_batches": 2, "train.tensorboard": False,
                                  "epochs": 0.0, "train.steps": 3, "train.log_every": 1, **extra})


def test_freeze_counts_every_parameter_once(vlm_folder):
    model, _ = load_vlm(vlm_folder / "dense")
    counts = freeze(model, ["vision", "language"])
    assert counts["vision"] + counts["connector"] + counts["language"] == sum(p.numel() for p in model.parameters())
    assert counts["trainable"] == counts["vision"] + counts["language"]
    assert all(not p.requires_grad for p in model.model.multi_modal_projector.parameters())
    assert all(p.requires_grad for p in model.model.vision_tower.parameters())
    lm = transformers.LlamaForCausalLM(model.config.text_config)
    assert [g for g, ps in param_groups(lm).items() if ps] == ["language"]
    with pytest.raises(Exception, match="trainable vision: LlamaForCausalLM has no such part"):
        freeze(lm, ["vision"])


def test_pt_trains_the_connector_only(vlm_folder, tmp_path):
    """vlm-pt: the connector trains; the vision tower and language model are not in the optimizer and end
    bit-equal; the epoch count sets the steps (10 training samples, 2 x 2 per step: 3 steps)."""
    from competesmoe.train.loop import Trainer
    cfg = small("vlm-pt", vlm_folder, tmp_path / "pt", epochs=1.0)
    record, model, data, _ = build(cfg, log=lambda *_: None)
    assert (data.n_train, len(data.valid.samples), record.train.steps) == (10, 2, 3)
    groups = param_groups(model.hf)
    before = {n: p.detach().clone() for n, p in model.hf.named_parameters()}
    trainer = Trainer(record, model=model, data=data, log=lambda *_: None)
    summary = trainer.train()
    assert summary["step"] == 3 and np.isfinite(summary["val_loss"])
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    for group, params in groups.items():
        for name, p in params:
            if group == "connector":
                assert id(p) in in_opt
            else:
                assert id(p) not in in_opt and torch.equal(p.detach(), before[name]), name
    assert all(not torch.equal(p.detach(), before[n]) for n, p in groups["connector"])


def test_validation_loss_is_the_reply_tokens_mean(vlm_folder):
    """The trainer's validation loss of a VLM: mean cross-entropy over the reply tokens, by hand."""
    from competesmoe.train.finetune import HFCausalLM
    from competesmoe.train.validation import lm_loss
    from competesmoe.data.llava import load_llava_data, pixels
    model, proc = load_vlm(vlm_folder / "dense")
    data = load_llava_data(vlm_folder / "data.jsonl", None, 0.5, proc, vlm_folder / "images", 128)
    assert all(s.pixel_values is None and s.image_paths for s in data.valid.samples)   # read batch by batch
    got = lm_loss(HFCausalLM(model), data.valid_batches(4))
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in data.valid.samples:
            logits = model(input_ids=s.input_ids[None], pixel_values=pixels(s, proc)).logits[0].double()
            for t in range(len(s.labels) - 1):
                if s.labels[t + 1] != -100:
                    nll -= float(torch.log_softmax(logits[t], -1)[s.labels[t + 1]])
                    n += 1
    assert got.tokens == n and got.loss == pytest.approx(nll / n, rel=1e-5)


VIT = {"model.router": "competesmoe", "train.lr": 1e-2, "train.ckpt_every": 2, "train.eval_every": 2,
       "train.schedule.omega": 0.5, "train.schedule.a_max": 2, "train.schedule.warmup": 0.0}


def test_vit_upcycles_competes_and_resumes_bit_exactly(vlm_folder, tmp_path):
    summary = finetune(small("vlm-vit", vlm_folder, tmp_path / "a", **{**VIT, "train.steps": 4}), log=lambda *_: None)
    model, _ = load_vlm(tmp_path / "a" / "hf")
    layers = moe_layers(model)
    assert len(layers) == 3 and model.config.competesmoe["upcycle"]["targets"] == "vision,connector"
    rows = [json.loads(r) for r in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert summary["step"] == 4 and sum(r.get("competing_layers", 0) for r in rows) > 0
    # interrupted after step 2, then resumed: the same weights at step 4, bit for bit
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "hf")
    shutil.rmtree(ckpt.step_dir(tmp_path / "b" / "checkpoints", 4))
    cfg = small("vlm-vit", vlm_folder, tmp_path / "b", **{**VIT, "train.steps": 4})
    finetune(cfg, resume=True, log=lambda *_: None)
    a, b = (load_file(str(tmp_path / r / "hf" / "model.safetensors")) for r in "ab")
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, diff[:5]


def test_stage_command_pt_then_vit_and_errors(vlm_folder, tmp_path, capsys):
    from competesmoe.cli import main
    small_flags = ["--steps", "2", "--precision", "fp32", "--set", "train.batch_size=2", "--set", "train.grad_accum=1",
                   "--set", "data.seq_len=128", "--set", "data.valid_fraction=0.2", "--set", "train.tensorboard=false"]
    data = ["--data", str(vlm_folder / "data.jsonl"), "--images", str(vlm_folder / "images")]
    assert main(["vlm", "vlm-pt", str(vlm_folder / "dense"), *data, "--out", str(tmp_path / "pt"), *small_flags]) == 0
    assert main(["vlm", "vlm-vit", str(tmp_path / "pt" / "hf"), *data, "--out", str(tmp_path / "vit"), *small_flags]) == 0
    model, proc = load_vlm(tmp_path / "vit" / "hf")
    assert len(moe_layers(model)) == 3                    # 2 vision layers + the connector
    assert proc.image_token_id == load_vlm(vlm_folder / "dense")[1].image_token_id
    # continued as saved (finetune.yaml: model, data, images), one step longer
    assert main(["vlm", "vlm-vit", "--out", str(tmp_path / "vit"), "--resume", "--steps", "3"]) == 0
    assert json.loads((tmp_path / "vit" / "summary.json").read_text())["step"] == 3
    capsys.readouterr()
    assert main(["vlm", "vlm-pt", str(vlm_folder / "dense"), "--data", str(tmp_path / "none.jsonl"),
                 "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "none.jsonl: no such file" in err
    assert main(["vlm", "vlm-pft", str(vlm_folder / "dense"), *data, "--out", str(tmp_path / "y"),
                 "--set", "trainable=head"]) == 1
    assert "trainable must be" in capsys.readouterr().err


def test_finetune_flags_reach_the_config(tmp_path):
    """`competesmoe finetune --targets/--llava/--images/--skip-bad` and `--steps` (explicit steps replace the
    stages' one epoch)."""
    import argparse
    from competesmoe.train.finetune_cli import add_arguments, build_config
    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = build_config(p.parse_args(["m", "--data", "d.json", "--llava", "--images", "imgs", "--skip-bad",
                                     "--targets", "connector", "--preset", "vlm-pft", "--steps", "7"]))
    assert (cfg.llava, cfg.images, cfg.skip_bad, cfg.model.targets, cfg.train.steps, cfg.epochs) == \
        (True, "imgs", True, "connector", 7, 0.0)
    cfg = build_config(p.parse_args(["m", "--data", "d.json", "--preset", "vlm-pt"]))
    assert cfg.llava and cfg.epochs == 1.0 and cfg.groups == ["connector"]
    with pytest.raises(Exception, match="settings of LLaVA-format data"):
        build_config(p.parse_args(["m", "--data", "d.txt", "--skip-bad"]))


def test_routing_analysis_and_eval_of_vit_checkpoints(vlm_folder, tmp_path):
    """analyze_vlm on a VIT run's checkpoints (the mid-run one before RUN/hf exists, and the final folder)
    against hooks and a reply cross-entropy computed here; `load_any` of a mid-run checkpoint of an
    upcycled VLM has the checkpoint's weights."""
    import math
    from competesmoe.analysis.vlm import analyze_vlm, vlm_batches
    from competesmoe.cli import main as cli_main
    from competesmoe.eval.loading import load_any
    run = tmp_path / "run"
    finetune(small("vlm-vit", vlm_folder, run, **{**VIT, "train.steps": 4}), log=lambda *_: None)
    mid = ckpt.step_dir(run / "checkpoints", 2)
    shutil.copytree(run, tmp_path / "early")             # a run still going: no hf/ yet
    shutil.rmtree(tmp_path / "early" / "hf")
    early = ckpt.step_dir(tmp_path / "early" / "checkpoints", 2)
    loaded = load_any(early, log=lambda *_: None)
    saved = load_file(str(early / "model.safetensors"))
    state = loaded.model.state_dict()
    assert loaded.kind == "finetune" and saved.keys() <= state.keys()
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    paths = [early, run / "hf"]
    report = analyze_vlm(paths, vlm_folder / "data.jsonl", vlm_folder / "images", batch_size=5, log=lambda *_: None)
    assert report["steps"] == [2, 4] and report["n_layers"] == 3 and len(report["ecr"]) == 1
    proc = load_vlm(vlm_folder / "dense")[1]
    batches = vlm_batches(vlm_folder / "data.jsonl", proc, vlm_folder / "images", batch_size=5)
    models = [load_any(mid, log=lambda *_: None).eval_model, load_vlm(run / "hf")[0]]
    idx = []
    for model in models:
        model.eval()
        got = [[] for _ in moe_layers(model)]
        hooks = [l.register_forward_hook(lambda m, a, o, i=i: got[i].append(o.indices)) for i, l in enumerate(moe_layers(model))]
        nll, n = 0.0, 0
        with torch.no_grad():
            for b in batches:
                logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits[:, :-1].double()
                y = b["labels"][:, 1:]
                keep = y != -100
                nll += float(torch.nn.functional.cross_entropy(logits[keep], y[keep], reduction="sum"))
                n += int(keep.sum())
        for h in hooks:
            h.remove()
        idx.append([torch.cat(g) for g in got])
    assert idx[0][0].shape[0] == 12 * 25                      # vision layer: 12 images x 25 patches
    per_layer = [float(1 - torch.tensor([len(set(a) & set(b)) / 2 for a, b in zip(x.tolist(), y.tolist())]).mean())
                 for x, y in zip(*idx)]
    assert report["ecr"][0]["per_layer"] == pytest.approx(per_layer)
    assert report["final"]["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert cli_main(["analyze", *map(str, paths), "--llava", str(vlm_folder / "data.jsonl"), "--images",
                     str(vlm_folder / "images"), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "analysis.md").is_file()


def test_cli_upcycles_a_vlm_folder_with_its_processor(vlm_folder, tmp_path, capsys):
    from competesmoe.cli import main as cli_main
    out = tmp_path / "moe"
    assert cli_main(["upcycle", str(vlm_folder / "dense"), str(out), "--router", "smoe"]) == 0
    assert "targets vision,connector" in capsys.readouterr().out
    model, proc = load_vlm(out)
    assert len(moe_layers(model)) == 3 and model.config.competesmoe["upcycle"]["router"] == "smoe"
    assert proc.image_token_id == load_vlm(vlm_folder / "dense")[1].image_token_id


def test_outputs_keep_the_aux_loss_when_rebuilt_from_their_fields():
    """DDP rebuilds a model's output from its dataclass fields (torch's pytree): an upcycled model's output
    type has an `aux_loss` field (adding a key to LLaVA's output crashed the first DDP step)."""
    from torch.utils import _pytree
    from competesmoe.model.upcycle import with_aux_loss
    cls = with_aux_loss(transformers.modeling_outputs.CausalLMOutputWithPast)
    out = cls(loss=torch.tensor(1.0), logits=torch.zeros(1, 2, 3), aux_loss=torch.tensor(0.5))
    leaves, spec = _pytree.tree_flatten(out)
    again = _pytree.tree_unflatten(leaves, spec)
    assert type(again) is cls and float(again.aux_loss) == 0.5 and float(again.loss) == 1.0
    moe_out = transformers.modeling_outputs.MoeCausalLMOutputWithPast     # has the field already
    assert with_aux_loss(moe_out) is moe_out


# --- two processes ----------------------------------------------------------------------------------
# Per-sequence balance (`entropy`): the `switch` loss is each rank's micro-batch statistic (docs/distributed.md).
# Every reply is one token, so each rank's mean over its reply tokens averages to the global mean.
DIST = {"train.steps": 4, "train.batch_size": 4, "train.grad_accum": 1, "train.lr": 1e-3, "train.ckpt_every": 2,
        "train.eval_every": 2, "model.losses.balance": "entropy", "train.schedule.omega": 0.5,
        "train.schedule.a_max": 2, "train.schedule.warmup": 0.0}
ATOL = 2e-5   # float32, 4 AdamW steps, two reduction orders (test_finetune_distributed.py)


def torchrun(folder, stage, out, sets, resume=False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "competesmoe",
           "vlm", stage, str(folder / "dense"), "--data", str(folder / "data.jsonl"), "--images", str(folder / "images"),
           "--out", str(out), "--precision", "fp32", "--set", "data.seq_len=128", "--set", "data.valid_fraction=0.2",
           "--set", "epochs=0", "--set", "train.tensorboard=false", "--set", "train.log_every=1",
           *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")], *(["--resume"] if resume else [])]
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout + res.stderr


def losses(run):
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def assert_same_run(one, two):
    """Losses of every step within ATOL, final weights within 1e-4 (4 AdamW steps of two reduction orders),
    and the final folder holds all 4 experts of every layer."""
    a_loss, b_loss = losses(one), losses(two)
    assert sorted(a_loss) == sorted(b_loss) == [1, 2, 3, 4]
    assert all(abs(a_loss[s] - b_loss[s]) < ATOL for s in a_loss), (a_loss, b_loss)
    a, b = (load_file(str(r / "hf" / "model.safetensors")) for r in (one, two))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4, msg=k)
    model, _ = load_vlm(two / "hf")
    assert [l.experts.n_experts for l in moe_layers(model)] == [4, 4, 4]


@pytest.fixture(scope="module")
def one_process_vit(vlm_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("vit-one") / "run"
    finetune(small("vlm-vit", vlm_folder, out, **DIST), log=lambda *_: None)
    return out


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_vit_on_two_gloo_processes_with_expert_parallelism_is_one_process(vlm_folder, one_process_vit, tmp_path,
                                                                          parallel):
    """FSDP2 shards every decoder layer and every vision-encoder layer (4 units + the root), or DDP replicates
    (SigLIP's unused pooling head is allowed for); the vision and connector experts are split over 2 ranks;
    a sharded checkpoint mid-run (step 2) leaves training as it was. Losses and final weights: one process's."""
    out = torchrun(vlm_folder, "vlm-vit", tmp_path / "two", {**DIST, "train.parallel": parallel,
                                                              "train.expert_parallel": 2})
    units = " (4 layer units + the root)" if parallel == "fsdp" else ""
    assert f"distributed: 2 processes (gloo), {parallel}{units} x expert parallel 2" in out
    assert "expert parallel: 2 ranks per group, 2 experts of each layer per rank" in out
    assert_same_run(one_process_vit, tmp_path / "two")


def test_one_process_vit_checkpoint_resumes_on_two_ranks_sharded(vlm_folder, one_process_vit, tmp_path):
    """A one-process checkpoint (no optimizer state for the weights that never had a gradient) continues on
    2 ranks with FSDP2 x expert parallelism as the one process did."""
    run = tmp_path / "run"
    shutil.copytree(one_process_vit, run)
    shutil.rmtree(run / "hf")
    shutil.rmtree(ckpt.step_dir(run / "checkpoints", 4))
    out = torchrun(vlm_folder, "vlm-vit", run, {**DIST, "train.parallel": "fsdp", "train.expert_parallel": 2},
                   resume=True)
    assert "resumed from" in out
    assert_same_run(one_process_vit, run)


def test_pt_on_two_gloo_processes_with_ddp_freezes_on_every_rank(vlm_folder, tmp_path):
    out = torchrun(vlm_folder, "vlm-pt", tmp_path / "pt", {"train.steps": 2, "train.batch_size": 4,
                                                           "train.grad_accum": 1, "train.ckpt_every": 2})
    assert "distributed: 2 processes (gloo), ddp" in out
    dense = load_file(str(vlm_folder / "dense" / "model.safetensors"))
    trained = load_file(str(tmp_path / "pt" / "hf" / "model.safetensors"))
    assert dense.keys() == trained.keys()
    changed = {k for k in dense if not torch.equal(dense[k], trained[k])}
    assert changed and all("multi_modal_projector" in k for k in changed), sorted(changed)[:5]
