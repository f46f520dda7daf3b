"""`competesmoe eval` on a tiny run and tiny task files; the lm-eval adapter gives the same numbers."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from competesmoe.cli import main
from test_hf import exported, tiny_run  # noqa: F401  (the same session fixtures: a tiny run and its export)


def _jsonl(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """Tiny benchmark files in the formats of ../shared/data/eval."""
    d = tmp_path_factory.mktemp("evaldata")
    _jsonl(d / "lambada_openai.jsonl", [{"context": "the cat sat on the", "continuation": " mat"},
                                        {"context": "he opened the door and saw his", "continuation": " brother"},
                                        {"context": "in the morning we walk to the", "continuation": " river"}])
    _jsonl(d / "piqa.jsonl", [{"query": "Question: How to boil water?\n", "choices": ["heat it", "freeze it"], "gold": 0},
                              {"query": "Question: How to dry a towel?\n", "choices": ["wet it", "hang it"], "gold": 1},
                              {"query": "Question: Open a jar?\n", "choices": ["twist the lid", "sing"], "gold": 0}])
    for name in ("arc_easy", "arc_challenge"):
        _jsonl(d / f"{name}.jsonl", [{"query": "Question: What melts ice?", "choices": ["heat", "cold", "dark"], "gold": 0},
                                     {"query": "Question: Sky colour?", "choices": ["green", "blue"], "gold": 1}])
    _jsonl(d / "hellaswag_val.jsonl", [
        {"activity_label": "Cooking", "ctx": "A man cuts onions. he", "endings": ["cries.", "flies [title] away.", "sleeps.", "runs."], "label": 0},
        {"activity_label": "Sports", "ctx": "A girl throws a ball. she", "endings": ["catches it.", "eats it.", "reads.", "sits."], "label": "0"}])
    (d / "blimp").mkdir()
    _jsonl(d / "blimp" / "anaphor_gender_agreement.jsonl.gz",
           [{"sentence_good": "Mary saw herself.", "sentence_bad": "Mary saw himself."},
            {"sentence_good": "John hurt himself.", "sentence_bad": "John hurt herself."}])
    _jsonl(d / "blimp" / "regular_plural.jsonl", [{"sentence_good": "The dogs bark.", "sentence_bad": "The dogs barks."}])
    (d / "wikitext2").mkdir()
    (d / "wikitext2" / "test.txt").write_text(" = Title = \n\n The river runs to the sea . \n\n = Other = \n\n Cats sleep . \n")
    return d


def test_eval_cli_writes_a_report_for_several_models(tiny_run, exported, data_dir, tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["eval", str(tiny_run), str(exported), "--tasks", "all,valid_ppl", "--data-dir", str(data_dir),
               "--limit", "2", "--batch-size", "4", "--out", str(out), "--device", "cpu", "--no-progress",
               "--names", "run,hf"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    runs = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in runs] == ["run", "hf"]
    assert set(runs[0]["tasks"]) == {"wikitext2", "lambada", "blimp", "piqa", "arc_easy", "arc_challenge",
                                     "hellaswag", "valid_ppl"}
    assert "valid_ppl" not in runs[1]["tasks"] and "skipping valid_ppl" in captured.err
    for task in runs[1]["tasks"]:  # checkpoint and exported folder score identically
        for metric in ("acc", "acc_norm", "ppl"):
            if metric in runs[0]["tasks"][task]:
                assert runs[1]["tasks"][task][metric] == pytest.approx(runs[0]["tasks"][task][metric], rel=1e-5)
    assert runs[0]["tasks"]["piqa"]["n"] == 2 and runs[0]["tasks"]["valid_ppl"]["ppl"] > 1
    md = (out / "results.md").read_text()
    assert "| run |" in md and "| hf |" in md and "HellaSwag" in md
    assert "| Model | PPL | LAMBADA |" in captured.out


def test_eval_cli_errors(tmp_path, data_dir, tiny_run, capsys):
    assert main(["eval", str(tmp_path / "nope"), "--tasks", "piqa", "--data-dir", str(data_dir),
                 "--out", str(tmp_path / "o")]) == 1
    assert "no such checkpoint" in capsys.readouterr().err
    assert main(["eval", str(tiny_run), "--tasks", "piqa,squad", "--out", str(tmp_path / "o")]) == 1
    assert "unknown task 'squad'" in capsys.readouterr().err
    for argv, msg in ((["--names", "a,b"], "--names has 2 names for 1 models"), (["--tasks", ","], "no task given"),
                      (["--tasks", "piqa", "--data-dir", str(tmp_path / "none")], "does not exist")):
        assert main(["eval", str(tiny_run), *argv, "--out", str(tmp_path / "o")]) == 1
        err = capsys.readouterr().err
        assert msg in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_lm_eval_adapter_matches_competesmoe_eval(tiny_run, exported, data_dir, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from competesmoe.eval import evaluate
    from competesmoe.eval.cli import load_model
    from competesmoe.eval.lm_eval_adapter import write_tasks
    tasks_dir = write_tasks(data_dir, tmp_path / "tasks")
    names = ["competesmoe_lambada", "competesmoe_piqa", "competesmoe_arc_easy", "competesmoe_arc_challenge",
             "competesmoe_hellaswag", "competesmoe_blimp"]
    out = lm_eval.simple_evaluate(model="competesmoe", model_args={"pretrained": str(exported), "device": "cpu"},
                                  tasks=names, task_manager=TaskManager(include_path=str(tasks_dir)),
                                  batch_size=4, bootstrap_iters=0, log_samples=False)
    res = out["results"]
    model, tok, _, max_length, eos = load_model(tiny_run)
    ours = evaluate(model, tok, ["lambada", "piqa", "arc_easy", "arc_challenge", "hellaswag", "blimp"],
                    data_dir=data_dir, max_length=max_length, prefix_token_id=eos, progress=False)["tasks"]
    assert res["competesmoe_lambada"]["acc,none"] == pytest.approx(ours["lambada"]["acc"])
    assert res["competesmoe_lambada"]["perplexity,none"] == pytest.approx(ours["lambada"]["ppl"], rel=1e-4)
    for task in ("piqa", "arc_easy", "arc_challenge", "hellaswag"):
        for metric in ("acc", "acc_norm"):
            assert res[f"competesmoe_{task}"][f"{metric},none"] == pytest.approx(ours[task][metric]), (task, metric)
    for paradigm, acc in ours["blimp"]["paradigms"].items():
        assert res[f"competesmoe_blimp_{paradigm}"]["acc,none"] == pytest.approx(acc)
    assert res["competesmoe_blimp"]["acc,none"] == pytest.approx(ours["blimp"]["acc"])
