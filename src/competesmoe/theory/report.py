"""Markdown table, JSON dump and log-log plot of a `run_study` result."""
from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import numpy as np


def _fmt(v, digits=3) -> str:
    return "—" if v is None else f"{v:+.{digits}f}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")   # a bare | would split a Markdown table cell


def markdown_table(result: dict) -> str:
    cfg = result["config"]
    head = (f"**{cfg['setting']} experts, {cfg['gating']} gating**, N* = {cfg['n_true']}, N = {cfg['n_experts']}, "
            f"d = {cfg['dim']}, n ∈ {cfg['sizes']}, {cfg['seeds']} seeds, {cfg['restarts']} restarts "
            f"(init: {cfg['init']}); largest Voronoi cell per fit: "
            + ", ".join(f"|C|={k} in {v}" for k, v in result["max_cell_counts"].items()))
    lines = [head, "",
             "| quantity | measured slope | 95% CI (seed bootstrap) | theory | source | points |",
             "|---|---|---|---|---|---|"]
    for m, s in result["slopes"].items():
        ci = "—" if s["ci"][0] is None else f"[{s['ci'][0]:+.3f}, {s['ci'][1]:+.3f}]"
        pts = f"{s['points']}" + (f" ({s['dropped']} empty)" if s["dropped"] else "")
        lines.append(f"| {_cell(result['metrics'][m])} | {_fmt(s['slope'])} | {ci} | {_fmt(s['theory'])} "
                     f"| {_cell(s['theory_source'])} | {pts} |")
    ns, share = median_by_n(result, "over_min_share")
    if ns:
        lines += ["", "Smallest atom's share of the weight of its over-specified cell (median over seeds; near 0: "
                  "the extra atoms are parked with vanishing weight rather than split around the true one): "
                  + ", ".join(f"n={n}: {v:.3f}" for n, v in zip(ns, share))]
    return "\n".join(lines) + "\n"


def _by_n(result: dict, key: str, positive: bool = False) -> dict[int, list[float]]:
    """The finite (and, if asked, positive) values of `key` over seeds, per sample size n."""
    by_n = collections.defaultdict(list)
    for r in result["records"]:
        v = r.get(key)
        if v is not None and math.isfinite(v) and (v > 0 or not positive):
            by_n[r["n"]].append(v)
    return by_n


def median_by_n(result: dict, key: str) -> tuple[list[int], list[float]]:
    by_n = _by_n(result, key)
    ns = sorted(by_n)
    return ns, [float(np.median(by_n[n])) for n in ns]


def geometric_means(result: dict, metric: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """Per n: geometric mean, 25% and 75% quantiles of the metric over seeds (finite values only)."""
    by_n = _by_n(result, metric, positive=True)
    ns = sorted(by_n)
    gm = [float(np.exp(np.mean(np.log(by_n[n])))) for n in ns]
    q1 = [float(np.quantile(by_n[n], 0.25)) for n in ns]
    q3 = [float(np.quantile(by_n[n], 0.75)) for n in ns]
    return ns, gm, q1, q3


def plot(result: dict, path: str | Path) -> None:
    """Left: the three main errors; right: the over-specified error split by parameter block."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), dpi=90)
    main = [m for m in result["slopes"] if not m.startswith("over[")]
    panels = [(axes[0], main), (axes[1], [m for m in result["slopes"] if m.startswith("over[")])]
    for ax, metrics in panels:
        for k, m in enumerate(metrics):
            _plot_metric(ax, result, m, plt.get_cmap("tab10")(k))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sample size n")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower left")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("error (geometric mean over seeds, IQR bars)")
    axes[0].set_title(f"{cfg['setting']} experts, {cfg['gating']} gating, N*={cfg['n_true']}, N={cfg['n_experts']}",
                      fontsize=10)
    axes[1].set_title("over-specified error by parameter block", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_metric(ax, result: dict, m: str, color) -> None:
    s = result["slopes"][m]
    ns, gm, q1, q3 = geometric_means(result, m)
    if not ns:
        return
    # The geometric mean can fall outside the quartiles: clip the bars at the marker.
    yerr = [np.maximum(np.subtract(gm, q1), 0), np.maximum(np.subtract(q3, gm), 0)]
    ax.errorbar(ns, gm, yerr=yerr, fmt="o", color=color, ms=4, capsize=2,
                label=f"{m}: slope {_fmt(s['slope'], 2)}")
    n_arr = np.array(ns, dtype=float)
    y0, n0 = np.exp(np.mean(np.log(gm))), np.exp(np.mean(np.log(n_arr)))
    if s["slope"] is not None:
        ax.plot(n_arr, y0 * (n_arr / n0) ** s["slope"], "-", color=color, lw=1)
    if s["theory"] is not None:
        ax.plot(n_arr, y0 * (n_arr / n0) ** s["theory"], ":", color=color, lw=1.5,
                label=f"{m}: theory {s['theory']:+.3f}")


def write_outputs(result: dict, out_dir: str | Path, stem: str) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / f"{stem}.md", "json": out / f"{stem}.json", "png": out / f"{stem}.png"}
    paths["json"].write_text(json.dumps(result, indent=1))   # first: the raw results are never lost
    paths["md"].write_text(markdown_table(result))
    plot(result, paths["png"])
    return paths
