"""A run folder after (or between) training: its trained model, its config check, its summary.

    model, cfg, tokenizer = load_trained("runs/tiny")   # newest good checkpoint, eval mode

Evaluation, export and analysis load models from here (not from the training loop); the loop uses the
same `check_same_model` / `load_weights` to resume.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
import yaml

from ..config import ConfigError, flatten
from ..model import MoETransformer
from . import checkpoint as ckpt
from .config import RunConfig

# Besides the model, what fixes the data order and the schedule of a run: a checkpoint only continues a
# run that agrees on these.
RESUME_TRAIN_KEYS = ("train.steps", "train.batch_size", "train.grad_accum", "train.seed")


def resolve_device(name: str) -> torch.device:
    """`auto`: CUDA where available, else CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_same_config(cfg: RunConfig, saved: str | dict, problem: str, keys: Iterable[str] | None = None,
                      saved_as: str = "saved") -> None:
    """Raise ConfigError(`problem`, then `key: <saved_as> X vs now Y` per difference) where `saved` (a
    RunConfig YAML or mapping) differs from `cfg` on the dotted `keys` (default: every key of `cfg`)."""
    saved = flatten(yaml.safe_load(saved) if isinstance(saved, str) else saved)
    now = flatten(cfg.to_dict())
    keys = list(now) if keys is None else list(keys)
    diffs = [f"{k}: {saved_as} {saved.get(k)!r} vs now {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]
    if diffs:
        raise ConfigError(f"{problem}:\n  " + "\n  ".join(diffs))


def check_same_model(cfg: RunConfig, saved_yaml: str, path) -> None:
    """A checkpoint only continues the run it came from: model and data-order settings must match."""
    keys = [k for k in flatten(cfg.to_dict()) if k.startswith("model.")] + list(RESUME_TRAIN_KEYS)
    check_same_config(cfg, saved_yaml, f"checkpoint {path} comes from another config", keys, saved_as="checkpoint")


def load_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], path) -> None:
    """Load a checkpoint's tensors into `model`, refusing any missing, unexpected or reshaped one."""
    tied = {"head.weight"} if getattr(model.cfg, "tie_embeddings", False) else set()
    expected = set(model.state_dict())
    missing = expected - set(tensors) - tied
    unexpected = set(tensors) - expected
    wrong = [k for k in expected & set(tensors) if tensors[k].shape != model.state_dict()[k].shape]
    if missing or unexpected or wrong:
        raise ConfigError(f"checkpoint {path} does not fit this model: missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}, wrong shapes {wrong[:5]}")
    model.load_state_dict(tensors, strict=False)


def load_trained(path: str | Path, device: str | torch.device = "cpu", log=print):
    """(model in eval mode, RunConfig, tokenizers.Tokenizer) from a checkpoint or run folder."""
    from tokenizers import Tokenizer
    folder = ckpt.resolve(path, log=log)
    tensors, _, cfg_yaml = ckpt.load(folder, map_location=device)
    cfg = RunConfig.from_dict(yaml.safe_load(cfg_yaml))
    model = MoETransformer(cfg.model).to(device)
    load_weights(model, tensors, folder)
    tok_path = next((p for p in (folder / "tokenizer.json", folder.parent.parent / "tokenizer.json") if p.is_file()), None)
    if tok_path is None:
        raise ckpt.CheckpointError(f"no tokenizer.json next to {folder} or in its run folder")
    return model.eval(), cfg, Tokenizer.from_file(str(tok_path))


def dump_summary(summary: dict, out_dir: Path) -> None:
    """`RUN/summary.json`: the final numbers of a finished run."""
    (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
