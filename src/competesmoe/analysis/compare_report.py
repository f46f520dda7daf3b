"""Tables, curves and files of `competesmoe compare` (compare.md, compare.json, PNGs)."""
from __future__ import annotations

import json
import os
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from ..train.metrics import read_metrics, val_points
from . import stats
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


def parse_effect(text: str | float | None) -> tuple[float, bool] | None:
    """`--detect`: "0.4%" (relative to the baseline's mean) or "0.5" (absolute PPL). Returns
    (value, relative) or None."""
    if text is None or text == "":
        return None
    t = str(text).strip()
    rel = t.endswith("%")
    try:
        v = float(t[:-1] if rel else t)
    except ValueError:
        from ..config import ConfigError
        raise ConfigError(f"--detect takes a number or a percentage such as 0.4%, got {text!r}") from None
    return (v / 100 if rel else v, rel)


def _fmt_ci(ci: tuple[float, float] | None, digits: int = 2) -> str:
    return "–" if ci is None else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _val_by_seed(rs: list[dict]) -> dict[int, float]:
    return {int(r["seed"]): float(r["summary"]["val_ppl"]) for r in rs if r["summary"].get("val_ppl") is not None}


def arm_statistics(runs: list[dict], alpha: float = stats.ALPHA) -> dict[str, stats.Summary]:
    """Validation PPL per arm: mean, std and the (1 − α) t interval over seeds."""
    return {label: stats.summary(list(_val_by_seed(rs).values()), alpha)
            for label, rs in _by_label(runs).items() if _val_by_seed(rs)}


def significance(runs: list[dict], baseline: str, effect: tuple[float, bool] | None = None,
                 alpha: float = stats.ALPHA, power: float = stats.POWER) -> list[dict[str, Any]]:
    """Every arm against `baseline` on validation PPL: difference (arm − baseline; negative = better),
    its interval and p-value (paired by seed when both arms ran the same seeds, Welch otherwise), the
    smallest difference this run could detect with `power`, and the seeds per arm needed to detect
    `effect` (absolute PPL, or relative to the baseline's mean)."""
    groups = _by_label(runs)
    if baseline not in groups:
        from ..config import ConfigError
        raise ConfigError(f"baseline {baseline!r} is not one of the arms: {', '.join(groups)}")
    base = _val_by_seed(groups[baseline])
    base_mean = sum(base.values()) / len(base)
    rows = []
    for label, rs in groups.items():
        if label == baseline:
            continue
        arm = _val_by_seed(rs)
        row: dict[str, Any] = {"arm": label, "baseline": baseline, "baseline_mean": base_mean}
        if len(arm) < 2 or len(base) < 2:
            row["verdict"] = "too few seeds (need >= 2 per arm)"
            rows.append(row)
            continue
        d = stats.compare_arms(arm, base, alpha, power)
        row.update(d.as_dict())
        row["rel_diff"] = d.diff / base_mean
        row["rel_ci"] = (d.ci[0] / base_mean, d.ci[1] / base_mean)
        row["verdict"] = ("not distinguishable" if not d.distinguishable
                          else ("lower PPL than " if d.diff < 0 else "higher PPL than ") + baseline)
        if effect is not None:
            delta = effect[0] * base_mean if effect[1] else effect[0]
            row["effect"] = delta
            row["seeds_needed"] = stats.seeds_needed(delta, d.sd, d.test == "paired", alpha, power)
        rows.append(row)
    return rows


def _portable(value: str) -> str:
    """An absolute path as a path relative to the working directory (what the user would type), so a
    committed report names no folder of the machine that made it."""
    if os.path.isabs(value):
        try:
            return os.path.relpath(value)
        except ValueError:
            return Path(value).name
    return value


def _portable_override(o: str) -> str:
    key, eq, value = o.partition("=")
    return f"{key}={_portable(value)}" if eq else o


def interval_plot(path: Path, arm_stats: dict[str, stats.Summary], sig: list[dict[str, Any]],
                  baseline: str) -> Path:
    """Left: each arm's validation PPL, mean and 95 % interval (seeds as dots); right: arm − baseline."""
    from ..plots import pyplot, save
    plt = pyplot()
    labels = list(arm_stats)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10.0, 0.9 + 0.45 * len(labels)))
    for i, label in enumerate(labels):
        s = arm_stats[label]
        if s.ci is not None:
            ax1.errorbar([s.mean], [i], xerr=[[s.mean - s.ci[0]], [s.ci[1] - s.mean]], fmt="o", capsize=3,
                         color="C0")
        else:
            ax1.plot([s.mean], [i], "o", color="C0")
    ax1.set_yticks(range(len(labels)), labels, fontsize=7)
    ax1.invert_yaxis()
    ax1.set(xlabel="validation PPL (mean, 95% CI over seeds)", title="Arms")
    ax1.grid(alpha=0.3)
    rows = [r for r in sig if "ci" in r]
    for i, r in enumerate(rows):
        ax2.errorbar([r["diff"]], [i], xerr=[[r["diff"] - r["ci"][0]], [r["ci"][1] - r["diff"]]], fmt="o",
                     capsize=3, color="C1" if r["distinguishable"] else "gray")
    ax2.axvline(0, color="k", lw=0.8)
    ax2.set_yticks(range(len(rows)), [r["arm"] for r in rows], fontsize=7)
    ax2.invert_yaxis()
    ax2.set(xlabel=f"PPL − {baseline} (95% CI; gray: not distinguishable)", title=f"Against {baseline}")
    ax2.grid(alpha=0.3)
    return save(fig, path)


def significance_markdown(arm_stats: dict[str, stats.Summary], sig: list[dict[str, Any]], baseline: str,
                          effect: tuple[float, bool] | None, alpha: float = stats.ALPHA,
                          power: float = stats.POWER) -> list[str]:
    level = round(100 * (1 - alpha))
    md = [f"\n## Statistics (validation PPL, baseline `{baseline}`)\n",
          f"Per arm: mean, sample std and {level}% t interval of the mean over seeds. Against the baseline: "
          "difference arm − baseline (negative = lower PPL), its interval and two-sided p-value — paired by "
          "seed on the seeds both arms ran (same data order and shared initialisation), Welch's test when "
          f"fewer than two are shared; *detectable*: the smallest true difference this design finds with {power:.0%} power "
          f"at level {alpha} ((t_(1−α/2) + t_(power))·SE)."
          + (f" *Seeds needed*: per arm, to detect {_effect_text(effect)} with the observed spread." if effect else "")
          + "\n",
          table(["Model", "seeds", "mean", "std", f"{level}% CI"],
                [[k, s.n, f"{s.mean:.2f}", "–" if s.std is None else f"{s.std:.2f}", _fmt_ci(s.ci)]
                 for k, s in arm_stats.items()]), ""]
    header = ["Model", "test", "diff", f"{level}% CI", "diff %", "p", "detectable", "verdict"]
    if effect:
        header.append(f"seeds for {_effect_text(effect)}")
    rows = []
    for r in sig:
        if "ci" not in r:
            rows.append([r["arm"]] + ["–"] * 6 + [r["verdict"]] + (["–"] if effect else []))
            continue
        design = f"paired, {r['n_a']} seeds" if r["test"] == "paired" else f"Welch, {r['n_a']} vs {r['n_b']}"
        row = [r["arm"], design, f"{r['diff']:+.2f}", _fmt_ci(r["ci"]), f"{100 * r['rel_diff']:+.2f}%",
               f"{r['p']:.3g}", f"{r['detectable']:.2f} ({100 * r['detectable'] / r['baseline_mean']:.1f}%)",
               r["verdict"]]
        if effect:
            row.append("–" if r.get("seeds_needed") is None else r["seeds_needed"])
        rows.append(row)
    md.append(table(header, rows))
    return md


def _seed_count(arm_stats: dict[str, stats.Summary], planned: int) -> str:
    counts = sorted({s.n for s in arm_stats.values()})
    if counts == [planned]:
        return f"{planned} seed(s)"
    return "the seeds each arm finished (" + ", ".join(f"{k}: {s.n}" for k, s in arm_stats.items()) + ")"


def _effect_text(effect: tuple[float, bool]) -> str:
    return f"{100 * effect[0]:g}%" if effect[1] else f"{effect[0]:g} PPL"


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
    settings = {**settings, "overrides": [_portable_override(o) for o in settings["overrides"]]}
    baseline = settings.get("baseline") or settings["routers"][0]
    effect = parse_effect(settings.get("detect"))
    arm_stats = arm_statistics(runs)
    sig = significance(runs, baseline, effect) if baseline in arm_stats else []
    if arm_stats:
        plots["val_ppl_ci"] = interval_plot(out / "val_ppl_ci.png", arm_stats, sig, baseline)
    md = [f"# Router comparison ({settings['preset']} preset)\n",
          f"Routers: {', '.join(settings['routers'])}; seeds {settings['seeds']}; overrides: "
          f"`{' '.join(settings['overrides']) or '(none)'}`.\n",
          f"## Quality\n\nValidation PPL: mean ± std over {_seed_count(arm_stats, n_seeds)}. Zero-shot columns "
          f"(if any): mean over seeds, accuracies in %. Avg. rank over every column (1 = best).\n",
          table(header, fmt_row)]
    md += significance_markdown(arm_stats, sig, baseline, effect) if arm_stats else []
    md += ["\n## Complexity\n",
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
                                [[r["label"], r["seed"], _rel_dir(r["dir"], out), r["summary"]["val_ppl"],
                                  r["summary"].get("resumed")] for r in runs])]
    paths = {"markdown": out / "compare.md", "json": out / "compare.json", **plots}
    paths["markdown"].write_text("\n".join(md) + "\n")
    portable_runs = [{**r, "dir": _rel_dir(r["dir"], out)} for r in runs]
    paths["json"].write_text(json.dumps({"settings": {**settings, "baseline": baseline},
                                         "quality": [{k: v for k, v in r.items()} for r in qrows],
                                         "arms": {k: v.as_dict() for k, v in arm_stats.items()},
                                         "significance": sig, "runs": portable_runs},
                                        indent=1, default=str) + "\n")
    return paths


def _rel_dir(run_dir: str | Path, out: Path) -> str:
    """A run folder relative to the comparison's folder (portable across machines)."""
    try:
        return str(Path(os.path.abspath(run_dir)).relative_to(os.path.abspath(out)))
    except ValueError:
        return _portable(str(run_dir))
