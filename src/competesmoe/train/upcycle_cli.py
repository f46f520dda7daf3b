"""`competesmoe upcycle SRC OUT`: a dense model folder -> an upcycled MoE folder (docs/upcycle.md).

SRC is a local Hugging Face folder (or a hub name when a network is there), a `competesmoe export`
folder or a run/checkpoint folder of a model trained with `--set model.dense=true`. OUT is a Hugging
Face folder with the tokenizer (and processor) files of SRC; load it after `import competesmoe` with
`AutoModelForCausalLM.from_pretrained(OUT)` (`AutoModelForImageTextToText` for a LLaVA-style VLM).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from ..config import ROUTERS, apply_overrides
from ..model.upcycle import UpcycleConfig, upcycle, upcycle_transformer
from .export import check_output_folder
from .loading import copy_side_files, is_competesmoe_source, load_competesmoe, load_dense_hf


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="dense model: Hugging Face folder or hub name, competesmoe export, or run/checkpoint folder")
    p.add_argument("out", help="output folder (a Hugging Face folder)")
    add_spec_arguments(p)
    p.add_argument("--force", action="store_true", help="write into OUT even if it is not empty")
    p.add_argument("--dry-run", action="store_true",
                   help="print which modules become MoE layers and the parameter counts (total, active per token), "
                        "from SRC's config.json alone; nothing is written")


def add_spec_arguments(p: argparse.ArgumentParser,
                       set_help: str = "any UpcycleConfig value, e.g. noise=0.01, router_opts.normalize=true, "
                                       "kappa=silu (repeatable)") -> None:
    """The upcycling flags, shared with `competesmoe finetune`."""
    p.add_argument("--experts", type=int, help="experts per MoE layer (N; default 4, the paper's VIT setting)")
    p.add_argument("--top-k", type=int, help="experts per token (K; default 2)")
    p.add_argument("--router", choices=ROUTERS, help="router policy (default competesmoe)")
    p.add_argument("--layers", help="layers to upcycle (of the vision encoder and/or decoder): all, or "
                                    "comma-separated indices such as 0,2,4")
    p.add_argument("--targets", help="what becomes MoE: comma-separated vision, connector, language (default: "
                                     "vision,connector for a VLM, as the paper's Table 1 model; language for a causal LM)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=set_help)


def spec_from_args(args: argparse.Namespace, base: UpcycleConfig | None = None) -> UpcycleConfig:
    flags = {"experts": args.experts, "top_k": args.top_k, "router": args.router, "layers": args.layers,
             "targets": getattr(args, "targets", None)}
    spec = apply_overrides(base or UpcycleConfig(), {k: v for k, v in flags.items() if v is not None})
    return apply_overrides(spec, args.overrides)


def upcycle_folder(src: str | Path, out: str | Path, spec: UpcycleConfig, force: bool = False,
                   log: Callable[[str], None] = print) -> Path:
    """Upcycle the dense model in `src` and write it (with its tokenizer) to `out`."""
    out = Path(out)
    check_output_folder(out, force)
    if is_competesmoe_source(src):
        from ..model.hf import save_hf
        dense, tok = load_competesmoe(src, log=log)
        model = upcycle_transformer(dense, spec)
        save_hf(model, tok, out)
        n = model.num_parameters()
    else:
        model = upcycle(load_dense_hf(src), spec)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out))
        copy_side_files(src, out)
        n = model.num_parameters()
    info = getattr(getattr(model, "config", None), "competesmoe", None) or {}
    targets = info.get("upcycle", {}).get("targets", "language")
    log(f"upcycled {src} -> {out}: {spec.experts} experts, K {spec.top_k}, router {spec.router}, "
        f"targets {targets}, layers {spec.layers} ({n:,} parameters)")
    return out


def main(args: argparse.Namespace) -> int:
    if args.dry_run:
        from .upcycle_plan import plan
        spec = spec_from_args(args)
        print(plan(args.src, spec).report(spec))
        return 0
    upcycle_folder(args.src, args.out, spec_from_args(args), force=args.force)
    return 0
