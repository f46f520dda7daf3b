"""Training end to end: exact resume after SIGKILL, faults and bad input, every router learns."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from competesmoe.config import ROUTERS, ConfigError
from competesmoe.train import Trainer, TrainingError, load_trained, run_preset
from competesmoe.train import checkpoint as ckpt
from competesmoe.train.loop import lr_at
from competesmoe.train.metrics import val_points

from conftest import SHARED_DATA

# A very small model on a small synthetic corpus: a step takes a few milliseconds.
SMALL = ["model.n_layers=2", "model.d_model=64", "model.moe.d_model=64", "model.moe.d_expert=32",
         "model.moe.n_experts=8", "model.moe.top_k=2", "model.max_seq_len=64", "data.seq_len=64",
         "data.vocab_size=384", "data.synthetic_train_chars=300000", "data.synthetic_valid_chars=30000",
         "data.progress=false", "train.batch_size=8", "train.eval_batches=4", "train.log_every=1",
         "train.tensorboard=false", "train.warmup_steps=5"]


def small_cfg(tmp_path, name="run", *extra):
    return run_preset("tiny", SMALL + [f"train.out_dir={tmp_path / name}", f"data.cache_dir={tmp_path / 'cache'}",
                                       *extra])


def cli(tmp_path, name, *extra):
    args = [a for o in SMALL + [f"data.cache_dir={tmp_path / 'cache'}", *extra] for a in ("--set", o)]
    return [sys.executable, "-m", "competesmoe.cli", "train", "--out", str(tmp_path / name), *args]


def final_weights(run: Path) -> dict:
    return load_file(str(ckpt.checkpoints(run / "checkpoints")[-1] / "model.safetensors"))


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    common = ["router=competesmoe", "omega=0.4", "a_max=1", "train.steps=16", "train.ckpt_every=2",
              "train.eval_every=8", "model.dropout=0.1", "train.keep_last=20"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cli(tmp_path, "full", *common), check=True, env=env, capture_output=True)

    kill_at = random.Random(1234).randint(3, 13)
    proc = subprocess.Popen(cli(tmp_path, "killed", *common), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        rows = metrics.read_text().splitlines() if metrics.exists() else []
        if any(json.loads(r)["step"] >= kill_at for r in rows):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_steps = [int(p.name[5:]) for p in ckpt.checkpoints(tmp_path / "killed" / "checkpoints")]
    assert killed_steps and max(killed_steps) < 16, "the run must really have been interrupted"

    res = subprocess.run(cli(tmp_path, "killed", *common) + ["--resume"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "resumed from" in res.stdout + res.stderr
    assert "final validation perplexity" in res.stdout and (tmp_path / "killed" / "val_ppl.png").stat().st_size > 0
    # one curve point per validation step, although the resumed run logged some steps twice
    assert [x for x, _ in val_points(tmp_path / "killed", 8 * 64)] == [8 * 512, 16 * 512]
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_corrupted_latest_checkpoint_falls_back_and_is_kept(tmp_path):
    cfg = small_cfg(tmp_path, "run", "train.steps=6", "train.ckpt_every=2", "train.eval_every=6")
    Trainer(cfg).train()
    paths = ckpt.checkpoints(tmp_path / "run" / "checkpoints")
    newest = paths[-1]
    data = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(data[: len(data) // 2])     # truncated
    with pytest.raises(ckpt.CheckpointError, match="truncated"):
        ckpt.verify(newest)
    messages = []
    assert ckpt.latest_good(tmp_path / "run" / "checkpoints", log=messages.append) == paths[-2]
    assert "truncated" in messages[0]
    # Flip a byte in the previous one too: the checksum catches it.
    prev = bytearray((paths[-2] / "trainer.pt").read_bytes())
    prev[100] ^= 0xFF
    (paths[-2] / "trainer.pt").write_bytes(bytes(prev))
    with pytest.raises(ckpt.CheckpointError, match="corrupted"):
        ckpt.verify(paths[-2])
    # Resuming uses the newest good one and re-saving never destroys the corrupt folder.
    tr = Trainer(cfg, resume=True, log=messages.append)
    assert tr.step == 2
    tr.train()
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert any(".replaced-" in n for n in names)
    ckpt.verify(ckpt.checkpoints(tmp_path / "run" / "checkpoints")[-1])


def test_interrupted_write_leaves_no_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    ckpt.save(root, 1, {"w": torch.ones(2)}, {"step": 1}, "a: 1\n")
    (root / ".tmp-step_00000002-1-1").mkdir()          # a crash mid-write leaves only a temp folder
    (root / "step_00000003").mkdir()                  # ... or a folder without manifest
    assert [p.name for p in ckpt.checkpoints(root)] == ["step_00000001", "step_00000003"]
    assert ckpt.latest_good(root, log=lambda *_: None).name == "step_00000001"


def test_checkpoint_from_another_config_is_a_clear_error(tmp_path):
    Trainer(small_cfg(tmp_path, "run", "train.steps=2", "train.eval_every=2")).train()
    other = small_cfg(tmp_path, "run", "train.steps=2", "model.moe.top_k=3")
    with pytest.raises(ConfigError, match="(?s)another config.*model.moe.top_k: checkpoint 2 vs now 3"):
        Trainer(other, resume=True)
    with pytest.raises(TrainingError, match="--resume"):
        Trainer(small_cfg(tmp_path, "run", "train.steps=2"))          # never silently overwritten


def _main(*argv) -> int:
    from competesmoe.cli import main
    return main(list(argv))


def _sets(tmp_path, *extra) -> list[str]:
    return [a for o in SMALL + [f"data.cache_dir={tmp_path / 'cache'}", *extra] for a in ("--set", o)]


def _rows(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_continues_the_run_as_saved_and_refuses_other_settings(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert _main("train", "--out", run, "--steps", "6", *_sets(tmp_path, "train.ckpt_every=3", "train.eval_every=3")) == 0
    final = final_weights(tmp_path / "run")
    import shutil
    shutil.rmtree(ckpt.checkpoints(tmp_path / "run" / "checkpoints")[-1])
    capsys.readouterr()
    # no flags: the run's own config (the tiny preset's would be another model and 300 steps)
    assert _main("train", "--out", run, "--resume") == 0, capsys.readouterr().err
    assert "resumed from" in capsys.readouterr().out
    again = final_weights(tmp_path / "run")
    assert all(torch.equal(final[k], again[k]) for k in final)             # exact resume
    # what may change does; anything else is refused, naming the setting, and changes nothing
    assert _main("train", "--out", run, "--resume", "--set", "train.eval_every=2", "--set", "train.log_every=5") == 0
    for flags, msg in ((["--set", "train.lr=0.01"], "train.lr: checkpoint 0.003 vs now 0.01"),
                       (["--router", "xmoe"], "model.moe.router: checkpoint 'competesmoe' vs now 'xmoe'"),
                       (["--set", "train.batch_size=16"], "train.batch_size: checkpoint 8 vs now 16"),
                       (["--data", str(tmp_path / "nope.txt")], "data.train: checkpoint 'synthetic' vs now")):
        capsys.readouterr()
        assert _main("train", "--out", run, "--resume", *flags) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: checkpoint") and msg in err and "may change only" in err, err
    assert final_weights(tmp_path / "run").keys() == final.keys()


def test_resume_with_more_steps_trains_longer_and_says_what_it_does_to_the_schedules(tmp_path, capsys):
    from competesmoe.moe import CompetitionSchedule
    run, sched = tmp_path / "run", ["router=competesmoe", "omega=0.3", "a_max=1", "train.schedule.warmup=0.2", "train.warmup_steps=1"]
    assert _main("train", "--out", str(run), "--steps", "6", *_sets(tmp_path, *sched)) == 0
    capsys.readouterr()
    assert _main("train", "--out", str(run), "--resume", "--steps", "12") == 0
    out = capsys.readouterr().out
    assert ("train.steps 6 -> 12: the learning rate now follows the cosine over 12 steps" in out
            and "the competition schedule is rebuilt for 12 steps, steps 1..6 keep their decisions" in out), out
    rows = {r["step"]: r for r in _rows(run) if "lr" in r}
    t = small_cfg(tmp_path, "run", *sched).train
    for step in range(1, 13):   # steps taken keep their learning rates; the new ones follow the 12-step cosine
        t.steps = 6 if step <= 6 else 12
        assert rows[step]["lr"] == pytest.approx(lr_at(step - 1, t)), step
    table = torch.load(ckpt.checkpoints(run / "checkpoints")[-1] / "trainer.pt", weights_only=False)["schedule"]["table"]
    old, new = (CompetitionSchedule(2, n, omega=0.3, a_max=1, warmup=0.2, seed=42).table for n in (6, 12))
    assert table.shape == (2, 12) and (table[:, :6].numpy() == old[:, :6]).all() and (table[:, 6:].numpy() == new[:, 6:]).all()
    assert (old[:, :6] != new[:, :6]).any()        # the 12-step table differs there: the first steps were kept
    assert sum(r["competing_layers"] for r in rows.values()) == table.sum() > 0
    assert _main("train", "--out", str(run), "--resume", "--steps", "3") == 1
    assert "train.steps=3 is before the checkpoint's step 12" in capsys.readouterr().err


def test_competing_layers_is_the_sum_over_the_logging_window(tmp_path):
    cfg = small_cfg(tmp_path, "run", "train.steps=8", "train.log_every=4", "train.eval_every=8", "router=competesmoe",
                    "omega=0.3", "a_max=1", "train.schedule.seed=1")
    trainer = Trainer(cfg, log=lambda *_: None)
    table = trainer.schedule.table.copy()
    trainer.train()
    rows = [r for r in _rows(tmp_path / "run") if "competing_layers" in r]
    assert [r["step"] for r in rows] == [4, 8]
    assert [r["competing_layers"] for r in rows] == [int(table[:, :4].sum()), int(table[:, 4:].sum())]
    # the logged steps alone would say something else: the window is what is reported
    assert [int(table[:, 3].sum()), int(table[:, 7].sum())] != [r["competing_layers"] for r in rows]


def test_activation_checkpointing_recomputes_each_layer_and_changes_nothing(tmp_path):
    from competesmoe.moe import moe_layers
    weights, calls = {}, {}
    for on in (False, True):
        cfg = small_cfg(tmp_path, f"ac-{on}", "train.steps=3", "train.eval_every=3", "train.grad_accum=2",
                        f"train.activation_checkpointing={str(on).lower()}")
        trainer = Trainer(cfg, log=lambda *_: None)
        n = [0]
        layer = moe_layers(trainer.model)[0]
        layer.register_forward_pre_hook(lambda *_: n.__setitem__(0, n[0] + 1) if layer.training else None)   # not eval
        trainer.train()
        weights[on], calls[on] = final_weights(tmp_path / f"ac-{on}"), n[0]
    assert calls == {False: 3 * 2, True: 3 * 2 * 2}      # each micro-batch's forward runs again in backward
    assert all(torch.equal(weights[False][k], weights[True][k]) for k in weights[False])


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_refused_resume_changes_nothing_in_the_run(tmp_path):
    run = tmp_path / "run"
    Trainer(small_cfg(tmp_path, "run", "train.steps=2", "train.eval_every=2", "train.tensorboard=true"),
            log=lambda *_: None).train()
    before = _tree(run)
    assert "tokenizer.json" in before and "config.yaml" in before
    other = small_cfg(tmp_path, "run", "train.steps=2", "model.moe.top_k=3", "data.vocab_size=300",
                      "train.tensorboard=true")
    with pytest.raises(ConfigError, match="another config"):
        Trainer(other, resume=True, log=lambda *_: None)
    assert _tree(run) == before  # config.yaml, tokenizer.json, metrics, tensorboard: untouched, nothing new


def test_checkpoint_holds_its_tokenizer(tmp_path):
    run = tmp_path / "run"
    Trainer(small_cfg(tmp_path, "run", "train.steps=2", "train.eval_every=2"), log=lambda *_: None).train()
    step = ckpt.checkpoints(run / "checkpoints")[-1]
    assert json.loads((step / "tokenizer.json").read_text()) == json.loads((run / "tokenizer.json").read_text())
    (run / "tokenizer.json").unlink()          # a lone checkpoint folder is enough to load the model
    model, _, tok = load_trained(step, log=lambda *_: None)
    assert tok.get_vocab_size() == model.cfg.vocab_size
    (step / "tokenizer.json").write_text("{}")  # and it is covered by the manifest
    with pytest.raises(ckpt.CheckpointError, match="tokenizer.json"):
        load_trained(step, log=lambda *_: None)


def test_grad_accum_keeps_no_micro_batch_output_alive(tmp_path):
    """Each micro-batch's logits/activations are freed before the next forward: memory does not grow
    with grad_accum (the trainer keeps detached scalars only)."""
    import weakref
    trainer = Trainer(small_cfg(tmp_path, "run", "train.steps=2", "train.grad_accum=4", "train.eval_every=100",
                                "train.ckpt_every=100"), log=lambda *_: None)
    refs, alive_at_forward = [], []
    forward = trainer.model.forward

    def tracked(*args, **kwargs):
        if not trainer.model.training:  # validation
            return forward(*args, **kwargs)
        alive_at_forward.append(sum(r() is not None for r in refs))
        out = forward(*args, **kwargs)
        refs.append(weakref.ref(out.logits))
        return out

    trainer.model.forward = tracked
    trainer.train()
    assert len(refs) == 8
    assert max(alive_at_forward) == 0, [(i, n) for i, n in enumerate(alive_at_forward) if n]


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_non_finite_loss(tmp_path, policy):
    cfg = small_cfg(tmp_path, "run", "train.steps=6", "train.ckpt_every=2", "train.eval_every=6",
                    f"train.nan_policy={policy}", "train.max_nan_skips=2")
    tr = Trainer(cfg)
    forward = tr.model.forward
    calls = {"n": 0}

    def poisoned(*a, **k):
        out = forward(*a, **k)
        calls["n"] += 1
        if calls["n"] == 3 and out.loss is not None:      # the third optimizer step
            out.loss = out.loss * float("nan")
        return out

    tr.model.forward = poisoned
    if policy == "stop":
        with pytest.raises(TrainingError, match="non-finite loss.*step 2.*step_00000002"):
            tr.train()
        ckpt.verify(ckpt.checkpoints(tmp_path / "run" / "checkpoints")[-1])   # the last good one survives
    else:
        before = {k: v.clone() for k, v in tr.model.state_dict().items()}
        summary = tr.train()
        assert summary["nan_skipped"] == 1 and summary["step"] == 6
        assert all(torch.isfinite(v).all() for v in tr.model.state_dict().values())
        assert any(not torch.equal(before[k], v) for k, v in tr.model.state_dict().items())


def test_too_many_consecutive_non_finite_losses_stop(tmp_path):
    tr = Trainer(small_cfg(tmp_path, "run", "train.steps=8", "train.max_nan_skips=2"))
    forward = tr.model.forward
    tr.model.forward = lambda *a, **k: (lambda o: (setattr(o, "loss", o.loss * float("inf")) if o.loss is not None else None) or o)(forward(*a, **k))
    with pytest.raises(TrainingError, match="3 consecutive non-finite"):
        tr.train()


@pytest.mark.parametrize("content,msg", [
    (b"", "empty"), (b"\x00\x01\x02binary", "binary"), (b"caf\xe9 au lait " * 50, "UTF-8")])
def test_bad_training_data_is_a_clear_cli_error(tmp_path, content, msg):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    res = subprocess.run(cli(tmp_path, "run", "train.steps=2") + ["--data", str(bad)], capture_output=True, text=True)
    assert res.returncode == 1 and msg.lower() in res.stderr.lower(), res.stderr
    res = subprocess.run(cli(tmp_path, "run", "train.steps=2") + ["--data", str(tmp_path / "missing.txt")],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "missing.txt" in res.stderr


@pytest.mark.parametrize("override,msg", [("train.lr=-1", "train.lr"), ("train.precision=fp8", "precision"),
                                          ("model.moe.top_k=99", "K must be <= N"), ("bogus=1", "bogus")])
def test_bad_cli_values_are_clear_errors(tmp_path, override, msg):
    res = subprocess.run(cli(tmp_path, "run", override), capture_output=True, text=True)
    assert res.returncode == 1 and msg in res.stderr, res.stderr


def test_config_file_applies_on_top_of_the_preset_and_flags_on_top_of_it(tmp_path):
    import yaml
    y = tmp_path / "run.yaml"
    y.write_text("train:\n  steps: 7\n  lr: 0.01\nmodel:\n  moe:\n    router: xmoe\n")
    res = subprocess.run([sys.executable, "-m", "competesmoe.cli", "train", "--preset", "small", "--config", str(y),
                          "--steps", "9", "--print-config"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    cfg = yaml.safe_load(res.stdout)
    small = run_preset("small")
    assert cfg["model"]["n_layers"] == small.model.n_layers == 8       # from --preset small
    assert cfg["model"]["moe"]["router"] == "xmoe" and cfg["train"]["lr"] == 0.01   # from the file
    assert cfg["train"]["steps"] == 9                                   # the flag wins over the file


@pytest.mark.parametrize("override,msg", [("model.moe.router_opts.proj_dim=abc", "expected an integer or null, got 'abc'"),
                                          ("chunk_tokens=1.5", "expected an integer or null, got 1.5"),
                                          ("n_shared=true", "expected an integer, got True")])
def test_mistyped_overrides_are_one_line_errors(override, msg, tmp_path):
    res = subprocess.run([sys.executable, "-m", "competesmoe.cli", "train", "--set", override, "--print-config"],
                         capture_output=True, text=True)
    assert res.returncode == 1 and msg in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_bad_yaml_config_is_a_clear_error(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("model:\n  n_layers: 0\n")
    res = subprocess.run([sys.executable, "-m", "competesmoe.cli", "train", "--config", str(y)],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "n_layers" in res.stderr


def test_lr_schedule_warmup_then_cosine():
    cfg = run_preset("tiny", ["train.steps=100", "train.warmup_steps=10", "train.lr=1.0", "train.min_lr_ratio=0.1"]).train
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55) and lr_at(100, cfg) == pytest.approx(0.1)


@pytest.mark.parametrize("router", ROUTERS)
def test_every_router_lowers_validation_loss_on_synthetic(tmp_path, router):
    cfg = small_cfg(tmp_path, router, f"router={router}", "train.steps=30", "train.eval_every=30", "omega=0.3",
                    "train.lr=5e-3")
    tr = Trainer(cfg)
    before = tr.evaluate()["val_loss"]
    after = tr.train()["val_loss"]
    assert after < before - 0.5, (before, after)


def test_bf16_autocast_trains(tmp_path):
    cfg = small_cfg(tmp_path, "bf16", "router=competesmoe", "omega=0.5", "train.steps=20", "train.eval_every=20",
                    "train.precision=bf16", "train.lr=5e-3")
    tr = Trainer(cfg)
    before = tr.evaluate()["val_loss"]
    after = tr.train()["val_loss"]
    assert after < before - 0.3
    model, run_cfg, tok = load_trained(tmp_path / "bf16")
    assert run_cfg.train.precision == "bf16" and tok.get_vocab_size() == run_cfg.model.vocab_size


@pytest.mark.shared_data
@pytest.mark.parametrize("router", ROUTERS)
def test_every_router_lowers_validation_loss_on_gutenberg_slice(tmp_path_factory, router):
    g = SHARED_DATA / "corpus" / "gutenberg"
    cache = tmp_path_factory.getbasetemp() / "gutenberg-cache"  # one BPE + token cache for all routers
    tmp_path = tmp_path_factory.mktemp(router)
    cfg = small_cfg(tmp_path, "gutenberg", f"data.train={g / 'train.jsonl.gz'}", f"data.valid={g / 'valid.jsonl.gz'}",
                    "data.max_train_chars=400000", "data.tokenizer_train_chars=400000", f"router={router}",
                    "omega=0.2", "train.steps=40", "train.eval_every=40", "train.lr=5e-3", f"data.cache_dir={cache}")
    tr = Trainer(cfg)
    before = tr.evaluate()["val_loss"]
    after = tr.train()["val_loss"]
    assert after < before - 0.5, (before, after)
