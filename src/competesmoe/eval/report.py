"""Results table shaped like the paper's Table 2 (rows = models), as Markdown and raw JSON."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

# (column, task, metric); "mc" is replaced by the chosen multiple-choice metric
COLUMNS = (("PPL", "wikitext2", "ppl"), ("LAMBADA", "lambada", "acc"), ("BLiMP", "blimp", "acc"),
           ("PIQA", "piqa", "mc"), ("ARC-E", "arc_easy", "mc"), ("ARC-C", "arc_challenge", "mc"),
           ("HellaSwag", "hellaswag", "mc"))
DETAIL_METRICS = ("acc", "acc_norm", "acc_bytes", "ppl", "word_perplexity", "bits_per_byte", "n")

Run = Mapping[str, Any]  # one `evaluate(...)` result: {"name", "tasks", "settings"}


def _runs(results: Run | Sequence[Run]) -> list[Run]:
    runs = [results] if isinstance(results, Mapping) else list(results)
    for run in runs:
        if not isinstance(run, Mapping) or "tasks" not in run:
            raise ValueError("expected evaluate() results: mappings with 'name' and 'tasks'")
    return runs


def table_rows(results: Run | Sequence[Run], mc_metric: str = "acc", ppl_task: str = "wikitext2") -> list[dict[str, Any]]:
    """One row per model: `ppl_task`'s token PPL, accuracies in percent (None where not evaluated)
    and their average."""
    rows = []
    for run in _runs(results):
        row: dict[str, Any] = {"Model": run.get("name", "model")}
        for column, task, metric in COLUMNS:
            task = ppl_task if column == "PPL" else task
            value = run["tasks"].get(task, {}).get(mc_metric if metric == "mc" else metric)
            row[column] = None if value is None else (value if column == "PPL" else 100.0 * value)
        accs = [row[c] for c, _, _ in COLUMNS[1:] if row[c] is not None]
        row["Avg."] = sum(accs) / len(accs) if accs else None
        rows.append(row)
    return rows


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "–"
    return format(value, spec) if isinstance(value, float) else str(value)


def _markdown(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])


def results_markdown(results: Run | Sequence[Run], mc_metric: str = "acc", ppl_task: str = "wikitext2") -> str:
    """The Table-2-style summary, then every scalar metric per model and task."""
    runs = _runs(results)
    header = ["Model"] + [c for c, _, _ in COLUMNS] + ["Avg."]
    rows = table_rows(runs, mc_metric, ppl_task)
    summary = _markdown(header, [[str(r["Model"])] + [_fmt(r[c], ".2f" if c == "PPL" else ".1f") for c in header[1:]]
                                 for r in rows])
    details = [[str(run.get("name", "model")), task]
               + [_fmt(metrics.get(m), ".4f" if m.startswith("acc") else ".6g") for m in DETAIL_METRICS]
               + [_fmt(*_speed(run, task, metrics))]
               for run in runs for task, metrics in run["tasks"].items()]
    return (f"PPL: `{ppl_task}` token perplexity (lower is better); accuracies in %, multiple choice = "
            f"`{mc_metric}`; Avg. = mean of the accuracy columns present. items/s: scored items (BLiMP: "
            f"pairs) per second of wall-clock, loading excluded.\n\n{summary}\n\n"
            f"{_markdown(['Model', 'Task', *DETAIL_METRICS, 'items/s'], details)}\n")


def _speed(run: Run, task: str, metrics: dict[str, Any]) -> tuple[float | None, str]:
    seconds = run.get("settings", {}).get("seconds", {}).get(task)
    n = metrics.get("n")
    return (n / seconds if n and seconds else None), ".1f"


def write_report(results: Run | Sequence[Run], out_dir: str | Path, mc_metric: str = "acc",
                 ppl_task: str = "wikitext2", stem: str = "results") -> dict[str, Path]:
    """Write `{stem}.md` (tables) and `{stem}.json` (raw results, a list of runs) into `out_dir`.

    `mc_metric` (acc / acc_norm / acc_bytes) fills PIQA, ARC and HellaSwag; `ppl_task` names the
    results entry whose `ppl` fills the PPL column (e.g. a validation set added by the caller)."""
    runs = _runs(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / f"{stem}.md", "json": out / f"{stem}.json"}
    paths["markdown"].write_text(results_markdown(runs, mc_metric, ppl_task), encoding="utf-8")
    paths["json"].write_text(json.dumps(runs, indent=2) + "\n", encoding="utf-8")
    return paths


def load_results(path: str | Path) -> list[dict[str, Any]]:
    """Runs saved by `write_report` (to add models to a table: `write_report(old + [new], dir)`)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return [data] if isinstance(data, dict) else data
