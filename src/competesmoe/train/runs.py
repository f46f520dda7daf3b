"""A run folder after (or between) training: its trained model, its config check, its summary.

    model, cfg, tokenizer = load_trained("runs/tiny")   # newest good checkpoint, eval mode

Evaluation, export and analysis load models from here (not from the training loop); the loop uses the
same `check_resumable` / `load_weights` to resume.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
import yaml

from ..config import ConfigError, flatten
from ..files import atomic_write
from ..model import MoETransformer
from . import checkpoint as ckpt
from .config import RunConfig

# What a resumed run may change: how it is watched, evaluated and saved, and where and how it runs; not
# what it computes. `train.steps` may change too, as the explicit "train longer" (see `Trainer._restore`).
RESUME_MAY_CHANGE = ("train.out_dir", "train.log_every", "train.eval_every", "train.eval_batches", "train.ckpt_every",
                     "train.keep_last", "train.tensorboard", "train.device", "train.compile", "train.parallel",
                     "train.expert_parallel", "train.activation_checkpointing", "train.nan_policy",
                     "train.max_nan_skips", "data.cache_dir", "data.progress", "model.backend", "model.moe.backend")

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


def check_resumable(cfg, saved_yaml: str, path, later: Iterable[str] = ()) -> None:
    """A checkpoint only continues the run it came from: every setting but `RESUME_MAY_CHANGE` and
    `train.steps` must be the saved one (`later`: settings not known yet, checked again on restore)."""
    skip = set(RESUME_MAY_CHANGE) | {"train.steps"} | set(later)
    keys = [k for k in flatten(cfg.to_dict()) if k not in skip]
    check_same_config(cfg, saved_yaml, f"checkpoint {path} comes from another config (a resume may change only "
                      f"{', '.join(k for k in RESUME_MAY_CHANGE if k != 'model.moe.backend')} and train.steps)",
                      keys, saved_as="checkpoint")


def newest_saved(out: str | Path, name: str = "config.yaml") -> tuple[Path, str] | None:
    """(folder, text) of the newest readable `name` among the run's checkpoints (their checksums are verified
    on restore), else the run folder's own; None when there is none."""
    out = Path(out)
    for folder in list(reversed(ckpt.checkpoints(out / "checkpoints"))) + [out]:
        try:
            text = (folder / name).read_text()
            if isinstance(yaml.safe_load(text), dict):
                return folder, text
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
    return None


def tied_names(model: torch.nn.Module) -> set[str]:
    """Names of parameters that are another parameter (tied embeddings): checkpoints store each tensor once."""
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return every - {n for n, _ in model.named_parameters()}


def load_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], path) -> None:
    """Load a checkpoint's tensors into `model`, refusing any missing, unexpected or reshaped one."""
    tied = tied_names(model)
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


def saved_run_config(out: str | Path | None, name: str = "config.yaml") -> dict | None:
    """The config a run folder was trained with, for `--resume` without the original flags: its newest
    checkpoint's `name`, else the run folder's own (None when there is neither)."""
    found = newest_saved(out, name) if out is not None else None
    return yaml.safe_load(found[1]) if found else None


def dump_summary(summary: dict, out_dir: Path) -> None:
    """`RUN/summary.json`: the final numbers of a finished run."""
    atomic_write(Path(out_dir) / "summary.json", json.dumps(summary, indent=1))
