"""`competesmoe upcycle SRC OUT`: a dense model folder -> an upcycled MoE folder (docs/upcycle.md).

SRC is a local Hugging Face folder (or a hub name when a network is there), a `competesmoe export`
folder or a run/checkpoint folder of a model trained with `--set model.dense=true`. OUT is a Hugging
Face folder with the tokenizer (and processor) files of SRC; load it after `import competesmoe` with
`AutoModelForCausalLM.from_pretrained(OUT)` (`AutoModelForImageTextToText` for a LLaVA-style VLM).
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any, Callable

from ..config import ROUTERS, apply_overrides
from .upcycle import UpcycleConfig, UpcycleError, upcycle, upcycle_transformer

_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="dense model: Hugging Face folder or hub name, competesmoe export, or run/checkpoint folder")
    p.add_argument("out", help="output folder (a Hugging Face folder)")
    add_spec_arguments(p)
    p.add_argument("--force", action="store_true", help="write into OUT even if it is not empty")


def add_spec_arguments(p: argparse.ArgumentParser,
                       set_help: str = "any UpcycleConfig value, e.g. noise=0.01, router_opts.normalize=true, "
                                       "kappa=silu (repeatable)") -> None:
    """The upcycling flags, shared with `competesmoe finetune`."""
    p.add_argument("--experts", type=int, help="experts per MoE layer (N; default 4, the paper's VIT setting)")
    p.add_argument("--top-k", type=int, help="experts per token (K; default 2)")
    p.add_argument("--router", choices=ROUTERS, help="router policy (default competesmoe)")
    p.add_argument("--layers", help="decoder layers to upcycle: all, or comma-separated indices such as 0,2,4")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=set_help)


def spec_from_args(args: argparse.Namespace, base: UpcycleConfig | None = None) -> UpcycleConfig:
    flags = {"experts": args.experts, "top_k": args.top_k, "router": args.router, "layers": args.layers}
    spec = apply_overrides(base or UpcycleConfig(), {k: v for k, v in flags.items() if v is not None})
    return apply_overrides(spec, args.overrides)


# --- loading a dense model ------------------------------------------------------------------------
def is_competesmoe_source(src: str | Path) -> bool:
    """An exported competesmoe folder, a run folder or a checkpoint folder."""
    from .hf import is_hf_folder
    p = Path(src)
    return is_hf_folder(p) or (p / "manifest.json").is_file() or (p / "checkpoints").is_dir()


def load_competesmoe(src: str | Path, log: Callable[[str], None] = print):
    """(MoETransformer, tokenizer) from an exported folder or a run/checkpoint folder."""
    from .hf import is_hf_folder, load_hf
    if is_hf_folder(src):
        hf, tok = load_hf(src)
        return hf.model, tok
    from ..train.runs import load_trained
    model, _, tok = load_trained(src, log=log)
    return model, tok


def auto_class(config: Any):
    """The Auto class that builds `config`'s model: causal LM, else image-text-to-text (LLaVA)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        if type(config) in auto._model_mapping:
            return auto
    raise UpcycleError(f"{type(config).__name__} (model_type {config.model_type!r}) is neither a causal LM nor an "
                       f"image-text-to-text model in transformers; nothing to upcycle")


def load_dense_hf(src: str | Path, device: str = "cpu"):
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(str(src))
        return auto_class(config).from_pretrained(str(src), dtype="auto").to(device)
    except OSError as e:  # no such folder, no config.json, unreadable weights, or no network for a hub name
        raise UpcycleError(f"{src}: cannot load a Hugging Face model ({e})") from e


def copy_side_files(src: str | Path, out: Path) -> list[str]:
    """Tokenizer, processor, chat template, ... of SRC into OUT (not weights, not config.json)."""
    p = Path(src)
    copied = []
    if p.is_dir():
        for f in sorted(p.iterdir()):
            if f.is_file() and f.name != "config.json" and not f.name.endswith(_WEIGHTS) \
                    and not f.name.endswith(".index.json") and not (out / f.name).exists():
                shutil.copy2(f, out / f.name)
                copied.append(f.name)
        return copied
    from transformers import AutoProcessor, AutoTokenizer  # a hub name
    for loader in (AutoProcessor, AutoTokenizer):
        try:
            loader.from_pretrained(str(src)).save_pretrained(str(out))
            return [loader.__name__]
        except (OSError, ValueError, TypeError):
            continue
    return copied


def upcycle_folder(src: str | Path, out: str | Path, spec: UpcycleConfig, force: bool = False,
                   log: Callable[[str], None] = print) -> Path:
    """Upcycle the dense model in `src` and write it (with its tokenizer) to `out`."""
    from ..train.export import check_output_folder
    out = Path(out)
    check_output_folder(out, force)
    if is_competesmoe_source(src):
        from .hf import save_hf
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
    log(f"upcycled {src} -> {out}: {spec.experts} experts, K {spec.top_k}, router {spec.router}, "
        f"layers {spec.layers} ({n:,} parameters)")
    return out


def main(args: argparse.Namespace) -> int:
    upcycle_folder(args.src, args.out, spec_from_args(args), force=args.force)
    return 0
