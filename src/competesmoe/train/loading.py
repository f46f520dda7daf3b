"""Loading a model to upcycle or fine-tune: a competesmoe export/run/checkpoint or a Hugging Face model.

`competesmoe upcycle` and `competesmoe finetune` both start here (`train/upcycle_cli.py`, `train/finetune.py`).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

from ..model.upcycle import UpcycleError

_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")


# --- loading a dense model ------------------------------------------------------------------------
def is_competesmoe_source(src: str | Path) -> bool:
    """An exported competesmoe folder, a run folder or a checkpoint folder."""
    from ..model.hf import is_hf_folder
    p = Path(src)
    return is_hf_folder(p) or (p / "manifest.json").is_file() or (p / "checkpoints").is_dir()


def load_competesmoe(src: str | Path, log: Callable[[str], None] = print):
    """(MoETransformer, tokenizer) from an exported folder or a run/checkpoint folder."""
    from ..model.hf import is_hf_folder, load_hf
    if is_hf_folder(src):
        hf, tok = load_hf(src)
        return hf.model, tok
    from .runs import load_trained
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
    """A Hugging Face model from a local folder or a hub name; UpcycleError (one line) when `src` is not one."""
    from transformers import AutoConfig
    where = _not_a_model(src)
    if where:
        raise UpcycleError(f"{src}: {where} (expected a Hugging Face model folder or hub name, a competesmoe "
                           f"export, or a run/checkpoint folder)")
    try:
        config = AutoConfig.from_pretrained(str(src))
        return auto_class(config).from_pretrained(str(src), dtype="auto").to(device)
    except (OSError, ValueError, KeyError) as e:  # unreadable config or weights, unknown type, no network for a hub name
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UpcycleError(f"{src}: cannot load a Hugging Face model ({first})") from None


def _not_a_model(src: str | Path) -> str | None:
    """Why a local `src` cannot be a model (None when it may be one, or may be a hub name)."""
    p = Path(src).expanduser()
    if p.is_file():
        return "a file, not a model folder"
    if p.is_dir():
        return None if (p / "config.json").is_file() else "not a model folder (no config.json)"
    if str(src).startswith(("/", ".", "~")) or str(src).count("/") > 1:
        return "no such folder"
    return None


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
