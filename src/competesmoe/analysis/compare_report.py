"""Tables, curves and files of `competesmoe compare` (compare.md, compare.json, PNGs)."""
from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from ..train.metrics import read_metrics, val_points
from .report import table


def _mean(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _pm(xs: Sequence[float]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def _by_label(runs: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        groups[r["label"]].append(r)
    return dict(groups)


def ranks(values: dict[str, float | None], lower_is_better: bool) -> dict[str, float]:
    """Rank 1 = best; ties share the mean rank; missing values get no rank."""
    present = sorted((v if lower_is_better else -v, k) for k, v in values.items() if v is not None)
    out: dict[str, float] = {}
    i = 0
    while i < len(present):
        j = i
        while j + 1 < len(present) and present[j + 1][0] == present[i][0]:
            j += 1
        for _, k in present[i:j + 1]:
            out[k] = (i + j) / 2 + 1
        i = j + 1
    return out


def quality_rows(runs: list[dict]) -> tuple[list[str], list[dict[str, Any]]]:
    """Table-2-style rows: validation PPL (mean ± std over seeds), zero-shot columns (mean over seeds,
    accuracies in %), Avg. accuracy and Avg. rank over every column present."""
    from ..eval import table_rows
    from ..eval.report import COLUMNS
    groups = _by_label(runs)
    rows, cols = [], []
    for label, rs in groups.items():
        row: dict[str, Any] = {"Model": label, "Val PPL": _mean([r["summary"]["val_ppl"] for r in rs]),
                               "val_ppl_seeds": [r["summary"]["val_ppl"] for r in rs]}
        evals = [table_rows(r["eval"])[0] for r in rs if "eval" in r]
        for column, _, _ in COLUMNS:
            vals = [e[column] for e in evals if e.get(column) is not None]
            if vals:
                row[column] = _mean(vals)
                if column not in cols:
                    cols.append(column)
        rows.append(row)
    acc_cols = [c for c in cols if c != "PPL"]
    for row in rows:
        row["Avg."] = _mean([row.get(c) for c in acc_cols]) if acc_cols else None
    rank_cols = ["Val PPL"] + cols
    per_col = {c: ranks({r["Model"]: r.get(c) for r in rows}, lower_is_better=c in ("Val PPL", "PPL"))
               for c in rank_cols}
    for row in rows:
        row["Avg. rank"] = _mean([per_col[c].get(row["Model"]) for c in rank_cols])
    return ["Model", "Val PPL"] + cols + (["Avg."] if acc_cols else []) + ["Avg. rank"], rows


def _train_tokens_per_s(run: dict) -> float | None:
    """Median of the logged training throughput (it ignores the few logging intervals that also hold a
    validation or a checkpoint); without log rows, tokens / wall-clock (evals included)."""
    try:
        logged = [r["tokens_per_s"] for r in read_metrics(run["dir"]) if r.get("tokens_per_s")]
    except OSError:
        logged = []
    if logged:
        return statistics.median(logged)
    s = run["summary"]
    return s["train_tokens"] / max(s.get("train_seconds") or 0, 1e-9)


def complexity_rows(runs: list[dict]) -> list[list[Any]]:
    rows = []
    for label, rs in _by_label(runs).items():
        s = [r["summary"] for r in rs]
        rows.append([label, s[0].get("params"), s[0].get("active_params"), s[0].get("train_tokens"),
                     _mean([x.get("train_seconds") for x in s]), _mean([_train_tokens_per_s(r) for r in rs]),
                     _mean([x.get("infer_tokens_per_s") for x in s])])
    return rows


def routing_rows(runs: list[dict]) -> list[list[Any]]:
    rows = []
    for label, rs in _by_label(runs).items():
        a = [r["analysis"] for r in rs if "analysis" in r]
        if not a:
            continue
        shift = [x["final"].get("shift", {}) for x in a]
        rows.append([label, _mean([_mean([e["ecr"] for e in x["ecr"]]) for x in a]),
                     _mean([x["ecr"][-1]["ecr"] if x["ecr"] else None for x in a]),
                     _mean([x["agreement"][-1]["agreement"] for x in a]),
                     _mean([x["agreement"][-1]["top1_agreement"] for x in a]),
                     _mean([_mean([e["selection"] for e in x["final"]["entropy"]]) for x in a]),
                     _mean([_mean([e["router_softmax"] for e in x["final"]["entropy"]]) for x in a]),
                     _mean([s.get("ppl") for s in shift]), _mean([s.get("shifted_ppl") for s in shift])])
    return rows


def _curve(points: list[list[tuple[float, float]]]) -> tuple[list[float], list[float]]:
    """Mean over seeds at each x (x present in any seed)."""
    acc: dict[float, list[float]] = defaultdict(list)
    for seed_points in points:
        for x, y in seed_points:
            acc[x].append(y)
    xs = sorted(acc)
    return xs, [sum(acc[x]) / len(acc[x]) for x in xs]


def _tokens_per_step(summary: dict) -> float:
    return summary["train_tokens"] / max(1, summary["step"])


def write_compare(runs: list[dict], settings: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    from ..plots import lines
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = _by_label(runs)
    val_curves = {k: _curve([val_points(r["dir"], _tokens_per_step(r["summary"])) for r in rs])
                  for k, rs in groups.items()}
    plots = {"val_ppl": lines(out / "val_ppl_vs_tokens.png", val_curves,
                              "training tokens", "validation PPL", "Validation perplexity", logy=True)}
    if any("analysis" in r for r in runs):
        plots["ecr"] = lines(out / "ecr.png", {k: _curve([[(e["to_step"], e["ecr"]) for e in r["analysis"]["ecr"]]
                                                          for r in rs]) for k, rs in groups.items()},
                             "step", "ECR vs previous checkpoint", "Expert change rate")
        plots["agreement"] = lines(out / "agreement.png",
                                   {k: _curve([[(a["step"], a["agreement"]) for a in r["analysis"]["agreement"]]
                                               for r in rs]) for k, rs in groups.items()},
                                   "step", "|I_R ∩ I_C| / K (mean over layers)", "Router–competition agreement")
    header, qrows = quality_rows(runs)
    fmt_row = [[r["Model"], _pm(r["val_ppl_seeds"])] + [r.get(c) for c in header[2:]] for r in qrows]
    n_seeds = len(settings["seeds"])
    md = [f"# Router comparison ({settings['preset']} preset)\n",
          f"Routers: {', '.join(settings['routers'])}; seeds {settings['seeds']}; overrides: "
          f"`{' '.join(settings['overrides']) or '(none)'}`.\n",
          f"## Quality\n\nValidation PPL: mean ± std over {n_seeds} seed(s). Zero-shot columns "
          f"(if any): mean over seeds, accuracies in %. Avg. rank over every column (1 = best).\n",
          table(header, fmt_row),
          "\n## Complexity\n",
          table(["Model", "params", "active", "train tokens", "train wall-clock (s)", "train tok/s (median)",
                 "inference tok/s"], complexity_rows(runs))]
    rrows = routing_rows(runs)
    if rrows:
        md += [f"\n## Routing ({settings['analysis_tokens']} fixed validation tokens, mean over seeds)\n",
               "ECR between consecutive checkpoints; agreement of router and competition (analysis mode) "
               "at the last checkpoint; entropies (nats, mean over layers) of the expert-selection frequency "
               "(max log N) and of the router's full softmax; PPL on the token set with top-K and with the "
               "top-(K+1) shift.\n",
               table(["Model", "mean ECR", "last ECR", "agreement", "top-1 agr.", "selection H", "softmax H",
                      "PPL", "shifted PPL"], rrows)]
    md += ["\n## Curves\n"] + [f"![{k}]({p.name})" for k, p in plots.items()]
    md += ["\n## Runs\n", table(["Model", "seed", "folder", "val PPL", "resumed"],
                                [[r["label"], r["seed"], r["dir"], r["summary"]["val_ppl"],
                                  r["summary"].get("resumed")] for r in runs])]
    paths = {"markdown": out / "compare.md", "json": out / "compare.json", **plots}
    paths["markdown"].write_text("\n".join(md) + "\n")
    paths["json"].write_text(json.dumps({"settings": settings, "quality": [{k: v for k, v in r.items()}
                                                                          for r in qrows],
                                         "runs": runs}, indent=1, default=str) + "\n")
    return paths
