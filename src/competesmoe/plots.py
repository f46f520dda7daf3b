"""Line plots as PNG files (matplotlib, Agg backend): the one plotting helper of the package.

It sits at the bottom of the import order so that training (the validation curve) and the analysis and
comparison reports all draw with it without importing each other.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def lines(path: Path, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str,
          title: str, logy: bool = False) -> Path:
    """One line per named (x, y) series."""
    plt = pyplot()
    many = len(series) > 6                       # legend beside the axes, styles beyond 10 colours
    fig, ax = plt.subplots(figsize=(9.0 if many else 6.4, 4.0))
    for i, (name, (x, y)) in enumerate(series.items()):
        ax.plot(list(x), list(y), marker="os^"[i // 10 % 3], markersize=3, ls=("-", "--", ":")[i // 10 % 3],
                label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if logy:
        ax.set_yscale("log")
    if series:
        ax.legend(fontsize=7, **({"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if many else {}))
    ax.grid(alpha=0.3)
    return save(fig, path)
