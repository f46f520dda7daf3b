"""PNG plots of the analysis report (matplotlib, Agg backend); line plots come from `competesmoe.plots`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..plots import lines, pyplot, save


def analysis_plots(report: dict[str, Any], out: Path) -> dict[str, Path]:
    """ECR vs step, agreement per layer, load heat map, entropy per layer."""
    plt = pyplot()
    paths: dict[str, Path] = {}
    L = report["n_layers"]
    if report["ecr"]:
        steps = [e["to_step"] for e in report["ecr"]]
        series = {"all layers": (steps, [e["ecr"] for e in report["ecr"]])}
        series.update({f"layer {i}": (steps, [e["per_layer"][i] for e in report["ecr"]]) for i in range(L)})
        paths["ecr"] = lines(out / "ecr.png", series, "step", "ECR (vs previous checkpoint)", "Expert change rate")

    fig, ax = plt.subplots(figsize=(7.4, 4.0))
    for a in report["agreement"]:
        ax.plot(range(L), [x["agreement"] for x in a["per_layer"]], marker="o", label=f"step {a['step']}")
    last = report["agreement"][-1]
    ax.plot(range(L), [x["top1_agreement"] for x in last["per_layer"]], "k--", marker="x",
            label=f"top-1, step {last['step']}")
    ax.set(xlabel="layer", ylabel="|I_R ∩ I_C| / K", title="Router–competition agreement", ylim=(0, 1.02))
    ax.set_xticks(range(L))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    paths["agreement"] = save(fig, out / "agreement.png")

    final = report["final"]
    fig, ax = plt.subplots(figsize=(7.0, 0.6 + 0.45 * L))
    im = ax.imshow(final["load"], aspect="auto", cmap="viridis")
    ax.set(xlabel="expert", ylabel="layer", title=f"Expert load (share of selections), step {final['step']}")
    fig.colorbar(im, ax=ax)
    paths["load"] = save(fig, out / "load.png")

    fig, ax = plt.subplots(figsize=(7.6, 4.0))
    ent = final["entropy"]
    width = 0.27
    for j, (key, label) in enumerate((("selection", "selection frequency"), ("router_softmax", "router softmax"),
                                      ("weights", "K weights"))):
        ax.bar([i + (j - 1) * width for i in range(L)], [e[key] for e in ent], width, label=label)
    ax.axhline(ent[0]["max_selection"], color="gray", ls="--", lw=1, label="log N")
    ax.axhline(ent[0]["max_weights"], color="gray", ls=":", lw=1, label="log K")
    ax.set(xlabel="layer", ylabel="entropy (nats)", title="Routing entropy per layer")
    ax.set_xticks(range(L))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    paths["entropy"] = save(fig, out / "entropy.png")
    return paths
