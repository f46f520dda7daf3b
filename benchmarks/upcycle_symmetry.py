"""How fine-tuning breaks the symmetry of upcycled experts (docs/results/upcycle-tiny-gutenberg.md).

For each checkpoint of a `competesmoe finetune` run of a competesmoe model (and the upcycled model at
step 0), per MoE layer: the smallest relative distance between two experts, min_{i<j} ‖W_i − W_j‖ / ‖W_i‖
over the concatenated expert weights, and on a fixed token set (the run's validation split) the share of
tokens whose competition affinities tie exactly (every expert the same).

    python benchmarks/upcycle_symmetry.py runs/upcycle/dense runs/upcycle/ft-competesmoe-s1 [--tokens 2048]
"""
from __future__ import annotations

import argparse

import torch

from competesmoe.analysis.analyze import checkpoint_paths, run_token_set
from competesmoe.moe import moe_layers
from competesmoe.moe.competition import all_affinities
from competesmoe.model.upcycle import UpcycleConfig, upcycle_transformer
from competesmoe.train.checkpoint import step_of
from competesmoe.train.runs import load_trained


def expert_distance(layer) -> float:
    w = torch.cat([layer.experts.w1.flatten(1), layer.experts.w2.flatten(1)], dim=1).detach()
    n = w.shape[0]
    return min(float((w[i] - w[j]).norm() / w[i].norm()) for i in range(n) for j in range(i + 1, n))


@torch.no_grad()
def layer_inputs(model, seqs) -> list[torch.Tensor]:
    """The inputs x of every MoE layer on `seqs` (captured by forward pre-hooks)."""
    xs: list[list[torch.Tensor]] = [[] for _ in moe_layers(model)]
    hooks = [l.register_forward_pre_hook(lambda m, a, i=i: xs[i].append(a[0].reshape(-1, a[0].shape[-1])))
             for i, l in enumerate(moe_layers(model))]
    model.eval()(seqs[:, :-1])
    for h in hooks:
        h.remove()
    return [torch.cat(x) for x in xs]


def describe(model, seqs) -> list[dict]:
    rows = []
    for layer, x in zip(moe_layers(model), layer_inputs(model, seqs)):
        a = all_affinities(layer.experts, x, layer.cfg.competition.kappa, 4096)[0]
        tied = (a.max(-1).values == a.min(-1).values).float().mean().item()
        rows.append({"min_rel_distance": expert_distance(layer), "tied_tokens": tied})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dense", help="the dense run the fine-tuning started from")
    p.add_argument("run", help="a finetune run folder")
    p.add_argument("--tokens", type=int, default=2048)
    args = p.parse_args()
    torch.set_num_threads(1)
    paths = checkpoint_paths([args.run])
    seqs = run_token_set(paths[-1], args.tokens, log=lambda *_: None)
    dense, _, _ = load_trained(args.dense, log=lambda *_: None)
    _, cfg, _ = load_trained(paths[-1], log=lambda *_: None)
    m = cfg.model.moe
    spec = UpcycleConfig(experts=m.n_experts, top_k=m.top_k, router=m.router, router_opts=m.router_opts,
                         competition=m.competition, losses=m.losses)
    models = [(0, upcycle_transformer(dense, spec))]
    models += [(step_of(pth), load_trained(pth, log=lambda *_: None)[0]) for pth in paths]
    print("| step | " + " | ".join(f"L{i} min dist / tied" for i in range(len(moe_layers(models[0][1])))) + " |")
    print("|---:|" + "---:|" * len(moe_layers(models[0][1])))
    for step, model in models:
        cells = [f"{r['min_rel_distance']:.2e} / {r['tied_tokens']:.2f}" for r in describe(model, seqs)]
        print(f"| {step} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
