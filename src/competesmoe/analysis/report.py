"""Markdown rendering of the analysis report (the JSON is the report dict itself)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return str(v)
        return f"{v:,.0f}" if abs(v) >= 1000 else (f"{v:.4g}" if isinstance(v, float) else str(v))
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return "\n".join(out + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows])


def analysis_markdown(r: dict[str, Any], plots: dict[str, Path]) -> str:
    L, final = r["n_layers"], r["final"]
    parts = [f"# Routing analysis ({r['router']})\n",
             f"{len(r['checkpoints'])} checkpoint(s), steps {r['steps']}; {r['tokens']} tokens; "
             f"{L} MoE layers, N={r['n_experts']} routed experts, K={r['top_k']}.\n"]
    if r["ecr"]:
        parts.append("## Expert change rate (consecutive checkpoints)\n")
        parts.append(table(["from", "to", "ECR"] + [f"L{i}" for i in range(L)],
                           [[e["from_step"], e["to_step"], e["ecr"], *e["per_layer"]] for e in r["ecr"]]))
    parts.append("\n## Router–competition agreement (|I_R ∩ I_C| / K; top-1)\n")
    parts.append(table(["step", "PPL", "mean", "top-1"] + [f"L{i}" for i in range(L)],
                       [[a["step"], a["ppl"], a["agreement"], a["top1_agreement"],
                         *[x["agreement"] for x in a["per_layer"]]] for a in r["agreement"]]))
    parts.append(f"\n## Entropy per layer (step {final['step']}, nats; max log N = "
                 f"{final['entropy'][0]['max_selection']:.3f}, log K = {final['entropy'][0]['max_weights']:.3f})\n")
    parts.append(table(["layer", "selection freq.", "router softmax", "K weights"],
                       [[i, e["selection"], e["router_softmax"], e["weights"]] for i, e in enumerate(final["entropy"])]))
    if "shift" in final:
        s = final["shift"]
        parts.append("\n## Top-(K+1) shift (ranks 2..K+1, weights renormalised)\n")
        parts.append(table(["routing", "PPL"], [["top-K", s["ppl"]], ["ranks 2..K+1", s["shifted_ppl"]],
                                                 ["change", s["delta_ppl"]]]))
        if "zero_shot" in s:
            from ..eval import results_markdown
            parts.append("\n" + results_markdown([s["zero_shot"]["base"], s["zero_shot"]["shifted"]]))
    parts.append("\n## Plots\n")
    parts.extend(f"![{k}]({p.name})" for k, p in plots.items())
    return "\n".join(parts) + "\n"


def write_analysis(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """analysis.json, analysis.md and the PNG plots in `out_dir`."""
    from .plots import analysis_plots
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = analysis_plots(report, out)
    paths = {"json": out / "analysis.json", "markdown": out / "analysis.md", **plots}
    paths["json"].write_text(json.dumps(report, indent=1) + "\n")
    paths["markdown"].write_text(analysis_markdown(report, plots))
    return paths
