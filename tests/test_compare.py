"""`competesmoe compare`: variant syntax, identical initialisation, report, no retraining, resume."""
import json

import pytest
import torch

from competesmoe.analysis import runs as runs_mod
from competesmoe.analysis.compare import run_compare
from competesmoe.analysis.compare_report import ranks
from competesmoe.analysis.runs import align_shared_init, run_config
from competesmoe.analysis.variants import Variant, parse_variant, parse_variants
from competesmoe.cli import main as cli_main
from competesmoe.config import ConfigError
from competesmoe.model import MoETransformer

from test_analysis import SMALL


def test_variant_syntax():
    v = parse_variant("competesmoe:kappa=silu+alpha=0")
    assert v == Variant("competesmoe:kappa=silu+alpha=0", "competesmoe", ("kappa=silu", "alpha=0"))
    assert v.slug == "competesmoe__kappa-silu__alpha-0"
    assert parse_variant("smoe") == Variant("smoe", "smoe")
    assert parse_variant(" competesmoe:train.lr=1e+3 ").overrides == ("train.lr=1e+3",)  # the + of a number
    labels = [v.label for v in parse_variants("smoe,competesmoe,competesmoe:distill=reference")]
    assert labels == ["smoe", "competesmoe", "competesmoe:distill=reference"]


@pytest.mark.parametrize("spec,msg", [
    ("smoe,,xmoe", "empty router entry"),
    ("gshard", "unknown router 'gshard'"),
    ("competesmoe:", "nothing after ':'"),
    ("competesmoe:kappa", "bad override 'kappa'"),
    ("competesmoe:kappa=silu+=3", "bad override '=3'"),
    ("competesmoe:kappa=silu+alpha", "bad override 'alpha'"),
    ("competesmoe:kappa=silu+", "bad override ''"),
    ("smoe:router=xmoe", "named before ':'"),
    ("smoe,smoe", "given twice"),
])
def test_bad_variant_syntax_is_a_clear_error(spec, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_variants(spec)


def test_ranks_share_ties():
    assert ranks({"a": 10.0, "b": 5.0, "c": 5.0, "d": None}, lower_is_better=True) == {"b": 1.5, "c": 1.5, "a": 3.0}
    assert ranks({"a": 10.0, "b": 5.0}, lower_is_better=False) == {"a": 1.0, "b": 2.0}


def test_every_router_starts_from_the_same_shared_parts(tmp_path):
    models = {}
    for spec in ("smoe", "xmoe", "competesmoe:kappa=silu"):
        v = parse_variant(spec)
        cfg = run_config("tiny", SMALL, v, 3, tmp_path / v.slug)
        assert cfg.model.moe.router == v.router and cfg.train.seed == cfg.data.seed == 3
        assert cfg.train.ckpt_every == cfg.train.eval_every == 30   # steps / 10 unless given
        torch.manual_seed(len(spec))                                  # different RNG state per router
        models[spec] = MoETransformer(cfg.model)
        assert align_shared_init(models[spec], cfg, 3) > 0
    ref = models["smoe"].state_dict()
    for spec in ("xmoe", "competesmoe:kappa=silu"):
        sd = models[spec].state_dict()
        shared = [k for k in sd if "router" not in k]
        assert shared and all(torch.equal(sd[k], ref[k]) for k in shared)


def test_bad_override_fails_before_training(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'nope'"):
        run_compare("smoe,competesmoe:nope=1", [1], "tiny", SMALL, tmp_path / "out", analysis_tokens=0)
    assert not (tmp_path / "out").exists()


def test_compare_cli_errors(tmp_path, capsys):
    assert cli_main(["compare", "--routers", "smoe,foo", "--out", str(tmp_path)]) == 1
    assert "unknown router 'foo'" in capsys.readouterr().err
    assert cli_main(["compare", "--seeds", "1,x", "--out", str(tmp_path)]) == 1
    assert "--seeds" in capsys.readouterr().err


def test_compare_reports_skips_finished_runs_and_resumes(tmp_path, monkeypatch):
    base = SMALL + [f"data.cache_dir={tmp_path / 'cache'}", "train.steps=4", "train.ckpt_every=2",
                    "train.eval_every=2"]
    out = tmp_path / "out"
    paths = run_compare("smoe,competesmoe:omega=0.5", [1], "tiny", base, out, analysis_tokens=64,
                        log=lambda *_: None)
    for key in ("markdown", "json", "val_ppl", "ecr", "agreement"):
        assert paths[key].is_file(), key
    md = paths["markdown"].read_text()
    assert "| smoe |" in md and "| competesmoe:omega=0.5 |" in md and "inference tok/s" in md
    report = json.loads(paths["json"].read_text())
    assert [r["Model"] for r in report["quality"]] == ["smoe", "competesmoe:omega=0.5"]
    summaries = sorted(out.glob("*/seed1/summary.json"))
    assert len(summaries) == 2
    stamps = {p: p.stat().st_mtime_ns for p in summaries}

    # a second call trains nothing
    class NoTrainer:
        def __init__(self, *a, **k):
            raise AssertionError("a finished run was trained again")
    monkeypatch.setattr(runs_mod, "Trainer", NoTrainer)
    logs = []
    run_compare("smoe,competesmoe:omega=0.5", [1], "tiny", base, out, analysis_tokens=64, log=logs.append)
    assert {p: p.stat().st_mtime_ns for p in summaries} == stamps
    assert sum("finished earlier" in line for line in logs) == 2
    with pytest.raises(ConfigError, match="(?s)trained with other settings.*train.lr"):
        run_compare("smoe", [1], "tiny", base + ["train.lr=1e-4"], out, analysis_tokens=0)
    monkeypatch.undo()

    # an interrupted run (no summary, last checkpoint missing) resumes from its checkpoint
    run = out / "smoe" / "seed1"
    (run / "summary.json").unlink()
    import shutil
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    (run / "analysis.json").unlink()
    run_compare("smoe", [1], "tiny", base, out, analysis_tokens=64, log=lambda *_: None)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed"] is True and summary["step"] == 4


def test_table7_diversity_without_competition_is_a_compare_variant(tmp_path):
    """Table 7, CM ✗ DL ✓: `smoe:router_diversity=true` (β·L_div on the router's top-K on the steps the
    schedule picks)."""
    v = parse_variant("smoe:router_diversity=true")
    cfg = run_config("tiny", [], v, seed=1, out_dir=tmp_path)
    assert cfg.model.moe.router == "smoe" and cfg.model.moe.competition.router_diversity is True
    model = MoETransformer(cfg.model).train()
    from competesmoe.moe import CompetitionSchedule, attach_schedule
    n_layers = cfg.model.n_layers
    sched = CompetitionSchedule(n_layers, 2, omega=1.0, a_max=n_layers)
    attach_schedule(model, sched)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16))
    out = model(ids, ids)
    assert all("diversity" in o.stats and not o.competed for o in out.moe)
    sched.table[:, 0] = False                       # a step the schedule does not pick: no L_div
    assert all("diversity" not in o.stats for o in model(ids, ids).moe)
