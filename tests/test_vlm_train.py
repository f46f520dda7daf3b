"""The three VLM stages (train/vlm.py): presets as Table 10, freezing by module group (frozen weights
unchanged and absent from the optimizer), the VIT stage upcycled and trained with the competition, and a
bit-exact resume. A tiny LLaVA (SigLIP + Llama) and a tiny processor, images from Pillow."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers.utils import logging as hf_logging

import competesmoe  # noqa: F401
from competesmoe import moe_layers
from competesmoe.train.vlm import VLM_PRESETS, freeze, load_vlm, make_trainer, param_groups, prepare, vlm_preset

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


def test_presets_are_table_10():
    pt, pft, vit = (VLM_PRESETS[n] for n in ("vlm-pt", "vlm-pft", "vlm-vit"))
    assert (pt.lr, pt.batch_size, pt.grad_accum, pt.groups, pt.upcycle) == (1e-3, 64, 4, ["connector"], False)
    assert (pft.lr, pft.batch_size, pft.groups, pft.upcycle) == (2e-6, 6, ["vision", "connector", "language"], False)
    assert (vit.lr, vit.batch_size, vit.upcycle, vit.max_length) == (4e-6, 5, True, 2048)
    m = vit.model
    assert (m.experts, m.top_k, m.targets, m.losses.balance_coef, m.losses.zloss_coef) == (4, 2, "vision,connector", 0.01, 0.001)
    assert (vit.schedule.omega, vit.schedule.a_max, vit.schedule.warmup) == (0.07, 9, 0.05)
    with pytest.raises(Exception, match="trainable must be"):
        vlm_preset("vlm-pt", {"trainable": "vision,head"})


def _samples(folder, proc, stage):
    from competesmoe.data.llava import load_llava
    return load_llava(folder / "data.jsonl", proc, folder / "images", max_length=stage.max_length).samples


def _small(name, **extra):
    return vlm_preset(name, {"batch_size": 2, "grad_accum": 2, "steps": 3, "save_steps": 100, "precision": "fp32",
                             "logging_steps": 1, **extra})


def test_pt_trains_the_connector_only(vlm_folder, tmp_path):
    stage = _small("vlm-pt")
    model, proc = load_vlm(vlm_folder / "dense")
    model = prepare(stage, model, log=lambda *_: None)
    groups = param_groups(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = make_trainer(stage, model, proc, _samples(vlm_folder, proc, stage), tmp_path / "pt")
    trainer.train()
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    for group, params in groups.items():
        for name, p in params:
            if group == "connector":
                assert id(p) in in_opt
            else:
                assert id(p) not in in_opt and torch.equal(p.detach(), before[name]), name
    assert all(not torch.equal(p.detach(), before[n]) for n, p in groups["connector"])


def test_freeze_counts_every_parameter_once(vlm_folder):
    model, _ = load_vlm(vlm_folder / "dense")
    counts = freeze(model, ["vision", "language"])
    assert counts["vision"] + counts["connector"] + counts["language"] == sum(p.numel() for p in model.parameters())
    assert counts["trainable"] == counts["vision"] + counts["language"]
    assert all(not p.requires_grad for p in model.model.multi_modal_projector.parameters())


def _vit_run(vlm_folder, out, steps, resume=False, save_steps=100):
    stage = _small("vlm-vit", steps=steps, save_steps=save_steps, lr=1e-2, **{"model.router": "competesmoe"},
                   **{"schedule.omega": 0.5, "schedule.a_max": 2, "schedule.warmup": 0.0})
    model, proc = load_vlm(vlm_folder / "dense")
    model = prepare(stage, model, log=lambda *_: None)
    trainer = make_trainer(stage, model, proc, _samples(vlm_folder, proc, stage), out)
    trainer.train(resume_from_checkpoint=True if resume else None)
    return trainer, model


def test_vit_upcycles_competes_and_resumes_bit_exactly(vlm_folder, tmp_path):
    trainer, full = _vit_run(vlm_folder, tmp_path / "a", steps=4, save_steps=2)
    layers = moe_layers(full)
    assert len(layers) == 3 and full.config.competesmoe["upcycle"]["targets"] == "vision,connector"
    assert layers[0].schedule is not None and layers[0].schedule.step == 4
    assert any(r.get("loss") is not None for r in trainer.state.log_history)
    # interrupted after step 2 (checkpoint-2), then resumed: the same weights at step 4, bit for bit
    import shutil
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    _, resumed = _vit_run(vlm_folder, tmp_path / "b", steps=4, save_steps=2, resume=True)
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, diff[:5]


def test_stage_command_pt_then_vit(vlm_folder, tmp_path, capsys):
    from competesmoe.train.vlm import main
    small = ["--set", "batch_size=2", "--set", "grad_accum=1", "--set", "steps=2", "--set", "precision=fp32"]
    data = ["--data", str(vlm_folder / "data.jsonl"), "--images", str(vlm_folder / "images")]
    assert main(["vlm-pt", str(vlm_folder / "dense"), *data, "--out", str(tmp_path / "pt"), *small]) == 0
    assert main(["vlm-vit", str(tmp_path / "pt" / "final"), *data, "--out", str(tmp_path / "vit"), *small]) == 0
    model, _ = load_vlm(tmp_path / "vit" / "final")
    assert len(moe_layers(model)) == 3                    # 2 vision layers + the connector
    capsys.readouterr()
    assert main(["vlm-pt", str(vlm_folder / "dense"), "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "none.jsonl: no such file" in err


def test_routing_analysis_of_a_vlm_with_images(vlm_folder, tmp_path):
    """analyze_vlm on two VIT checkpoints against hooks and a reply cross-entropy computed here."""
    import math
    from competesmoe.analysis.vlm import analyze_vlm, vlm_batches
    from competesmoe.cli import main as cli_main
    from transformers import AutoModelForImageTextToText, AutoProcessor
    _vit_run(vlm_folder, tmp_path / "run", steps=4, save_steps=2)
    ckpts = [tmp_path / "run" / "checkpoint-2", tmp_path / "run" / "checkpoint-4"]
    for c in ckpts:                                             # the Trainer saves no processor: add it
        AutoProcessor.from_pretrained(vlm_folder / "dense").save_pretrained(c)
    report = analyze_vlm(ckpts, vlm_folder / "data.jsonl", vlm_folder / "images", batch_size=5, log=lambda *_: None)
    assert report["steps"] == [2, 4] and report["n_layers"] == 3 and len(report["ecr"]) == 1
    proc = AutoProcessor.from_pretrained(ckpts[0])
    batches = vlm_batches(vlm_folder / "data.jsonl", proc, vlm_folder / "images", batch_size=5)
    idx, nll, n = [], 0.0, 0
    for c in ckpts:
        model = AutoModelForImageTextToText.from_pretrained(c).eval()
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
    assert cli_main(["analyze", *map(str, ckpts), "--llava", str(vlm_folder / "data.jsonl"), "--images",
                     str(vlm_folder / "images"), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "analysis.md").is_file()


def test_vlm_command_of_the_cli(vlm_folder, tmp_path, capsys):
    from competesmoe.cli import main as cli_main
    rc = cli_main(["vlm", "vlm-pft", str(vlm_folder / "dense"), "--data", str(vlm_folder / "data.jsonl"), "--images",
                   str(vlm_folder / "images"), "--out", str(tmp_path / "pft"), "--set", "steps=1", "--set", "batch_size=2",
                   "--set", "grad_accum=1", "--set", "precision=fp32"])
    assert rc == 0 and (tmp_path / "pft" / "final" / "config.json").is_file()
    assert cli_main(["vlm", "vlm-pft", str(vlm_folder / "dense"), "--data", str(vlm_folder / "data.jsonl"), "--out",
                     str(tmp_path / "x"), "--set", "trainable=head"]) == 1
    assert "trainable must be" in capsys.readouterr().err


def test_cli_upcycles_a_vlm_folder_with_its_processor(vlm_folder, tmp_path, capsys):
    from competesmoe.cli import main as cli_main
    from transformers import AutoProcessor
    out = tmp_path / "moe"
    assert cli_main(["upcycle", str(vlm_folder / "dense"), str(out), "--router", "smoe"]) == 0
    assert "targets vision,connector" in capsys.readouterr().out
    model, proc = load_vlm(out)
    assert len(moe_layers(model)) == 3 and model.config.competesmoe["upcycle"]["router"] == "smoe"
    assert proc.image_token_id == AutoProcessor.from_pretrained(vlm_folder / "dense").image_token_id


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


def test_vit_stage_on_two_gloo_processes(vlm_folder, tmp_path):
    """`torchrun --nproc-per-node 2 ... competesmoe vlm vlm-vit` (DDP over gloo through transformers' Trainer):
    trains, rank 0 writes the final folder, and it loads in one process with its MoE layers."""
    import os
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "competesmoe", "vlm", "vlm-vit",
           str(vlm_folder / "dense"), "--data", str(vlm_folder / "data.jsonl"), "--images", str(vlm_folder / "images"),
           "--out", str(tmp_path / "vit"), "--set", "batch_size=2", "--set", "grad_accum=1", "--set", "steps=2",
           "--set", "precision=fp32"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    model, _ = load_vlm(tmp_path / "vit" / "final")
    assert len(moe_layers(model)) == 3 and model.config.competesmoe["upcycle"]["targets"] == "vision,connector"
    state = json.loads((tmp_path / "vit" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
