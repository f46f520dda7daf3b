"""`competesmoe export CHECKPOINT_OR_RUN OUT_DIR`: a Hugging Face folder from a training checkpoint.

The folder holds config.json, model.safetensors, generation_config.json and the tokenizer files;
load it with `import competesmoe.model.hf` then `AutoModelForCausalLM.from_pretrained(OUT_DIR)`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import CompeteSMoEError


class ExportError(CompeteSMoEError, FileExistsError):
    """The output folder cannot take the export (not a folder, or not empty without --force)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint folder (checkpoints/step_XXXXXXXX) or run folder (newest good checkpoint)")
    parser.add_argument("out_dir", help="output folder for the Hugging Face model")
    parser.add_argument("--force", action="store_true", help="write into OUT_DIR even if it is not empty")


def check_output_folder(out: Path, force: bool) -> None:
    """A model folder is written only into a new or empty folder, unless `force`: nothing is overwritten."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} is not empty; pass --force to overwrite its files")


def export(checkpoint: str | Path, out_dir: str | Path, force: bool = False, log=print) -> Path:
    """Load `checkpoint` with `load_trained` and write the Hugging Face folder `out_dir`."""
    from ..model.hf import save_hf
    from .runs import load_trained
    out = Path(out_dir)
    check_output_folder(out, force)
    model, _, tokenizer = load_trained(checkpoint, log=log)
    save_hf(model, tokenizer, out)
    log(f"exported {checkpoint} -> {out} ({model.num_parameters():,} parameters)")
    return out


def main(args: argparse.Namespace) -> int:
    export(args.checkpoint, args.out_dir, force=args.force)
    return 0
