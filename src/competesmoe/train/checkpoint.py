"""Checkpoints: atomic, verified, never overwritten, the last N kept.

A checkpoint is a folder `RUN/checkpoints/step_00000100/` holding
  model.safetensors   the model weights
  trainer.pt          optimizer, competition schedule, RNG states, data position, counters
  config.yaml         the full run config
  tokenizer.json      the tokenizer (so a checkpoint is self-contained)
  manifest.json       written last: size and SHA-256 of each file above
It is written into a temporary folder, every file fsynced, then renamed into place, so a crash leaves
either a complete checkpoint or an ignored `.tmp-*` folder. `latest_good` walks back from the newest
checkpoint to the first one whose manifest verifies, saying which it skipped and why.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import CompeteSMoEError
from ..files import fsync_dir, fsync_dirs, fsync_write

FILES = ("model.safetensors", "trainer.pt", "config.yaml")
PREFIX = "step_"


class CheckpointError(CompeteSMoEError, RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or from another configuration."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def step_dir(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f"{PREFIX}{step:08d}"


def step_of(path: str | Path) -> int | None:
    """The step of a checkpoint folder named `step_<digits>`; None for any other name."""
    digits = Path(path).name[len(PREFIX):]
    return int(digits) if Path(path).name.startswith(PREFIX) and digits.isdigit() else None


def save(ckpt_root: str | Path, step: int, model_state: dict[str, torch.Tensor], trainer_state: dict,
         config_yaml: str, keep_last: int | None = None, tokenizer_json: str | None = None) -> Path:
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    # safetensors refuses shared storage (tied embeddings): store each tensor once, contiguous.
    tensors, seen = {}, {}
    for k, v in model_state.items():
        key = (v.data_ptr(), v.shape, v.stride()) if v.numel() else None
        if key is not None and key in seen:
            continue
        seen[key] = k
        tensors[k] = v.detach().cpu().contiguous()
    save_file(tensors, str(tmp / "model.safetensors"))
    with open(tmp / "model.safetensors", "rb+") as f:
        os.fsync(f.fileno())
    buf = io.BytesIO()
    torch.save(trainer_state, buf)
    fsync_write(tmp / "trainer.pt", buf.getvalue())
    return _finish(root, tmp, final, step, config_yaml, tokenizer_json, keep_last)


def _finish(root: Path, tmp: Path, final: Path, step: int, config_yaml: str, tokenizer_json: str | None,
            keep_last: int | None) -> Path:
    """Config, tokenizer and the manifest of every file in `tmp`, then the atomic rename into place."""
    fsync_write(tmp / "config.yaml", config_yaml.encode())
    if tokenizer_json is not None:
        fsync_write(tmp / "tokenizer.json", tokenizer_json.encode())
    names = sorted(str(f.relative_to(tmp)) for f in tmp.rglob("*") if f.is_file())
    manifest = {"step": step, "files": {n: {"bytes": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)} for n in names}}
    fsync_write(tmp / "manifest.json", json.dumps(manifest, indent=1).encode())
    fsync_dirs(tmp)
    if final.exists():  # never overwrite: keep whatever was there (e.g. a corrupt one) aside
        final.rename(root / f"{final.name}.replaced-{time.time_ns()}")
    tmp.rename(final)
    fsync_dir(root)
    if keep_last:
        for old in checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(ckpt_root: str | Path) -> list[Path]:
    """Checkpoint folders, oldest first (temporary and set-aside folders are not checkpoints)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(dirs, key=step_of)


def verify(path: str | Path) -> None:
    """Raise CheckpointError naming what is wrong with the checkpoint at `path`."""
    path = Path(path)
    mf = path / "manifest.json"
    if not mf.is_file():
        raise CheckpointError(f"{path}: no manifest.json (incomplete or not a checkpoint)")
    try:
        manifest = json.loads(mf.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: unreadable manifest.json ({e})") from None
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: missing {name}")
        if f.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"{path}: {name} is truncated ({f.stat().st_size} of {meta['bytes']} bytes)")
        if _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{path}: {name} is corrupted (checksum mismatch)")


def latest_good(ckpt_root: str | Path, log=print) -> Path | None:
    for path in reversed(checkpoints(ckpt_root)):
        try:
            verify(path)
            return path
        except CheckpointError as e:
            log(f"warning: skipping checkpoint: {e}")
    return None


def resolve(path: str | Path, log=print) -> Path:
    """A checkpoint folder from a checkpoint, a `checkpoints/` folder or a run folder (newest good one)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run folder")
    if (path / "manifest.json").is_file():
        verify(path)
        return path
    for root in (path / "checkpoints", path):
        found = latest_good(root, log)
        if found is not None:
            return found
    raise CheckpointError(f"{path}: no valid checkpoint found")


def load(path: str | Path, map_location="cpu", tensors: bool = True
         ) -> tuple[dict[str, torch.Tensor] | None, dict, str]:
    """(model tensors, trainer state, config yaml) of a verified checkpoint folder, either format;
    `tensors=False` skips reading the weights (a sharded run loads its shards with `load_shards`)."""
    path = Path(path)
    verify(path)
    if not tensors:
        tensors = None
    elif is_sharded(path):
        tensors = full_model_tensors(path, map_location)
    else:
        tensors = load_file(str(path / "model.safetensors"), device=str(map_location))
    trainer_state = torch.load(path / "trainer.pt", map_location=map_location, weights_only=False)
    return tensors, trainer_state, (path / "config.yaml").read_text()


# --- sharded checkpoints (several processes) ----------------------------------------------------------
# A run on P > 1 processes writes `dcp/` (torch.distributed.checkpoint: `.metadata` + one file per rank,
# {"model": weights, "optim": AdamW state by parameter name}, DTensors where weights are sharded) instead
# of model.safetensors, and trainer.pt without the optimizer. The same manifest covers every file. DCP
# reshards on load, so such a checkpoint resumes on any number of processes, and a single process
# (resume, eval, export) reads it without a process group.
SHARDS = "dcp"


def is_sharded(path: str | Path) -> bool:
    return (Path(path) / SHARDS).is_dir()


def save_sharded(ckpt_root: str | Path, step: int, shards: dict, trainer_state: dict, config_yaml: str,
                 keep_last: int | None = None, tokenizer_json: str | None = None) -> Path:
    """Called by every rank: each writes its shards, rank 0 the rest (same atomicity as `save`)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    root = Path(ckpt_root)
    final = step_dir(root, step)
    name = [f".tmp-{final.name}-{os.getpid()}-{time.time_ns()}"]
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
    dist.broadcast_object_list(name, src=0)   # one temporary folder for all ranks (a shared file system)
    tmp = root / name[0]
    dcp.save(shards, storage_writer=dcp.FileSystemWriter(str(tmp / SHARDS), sync_files=True))
    dist.barrier()
    if dist.get_rank() == 0:
        buf = io.BytesIO()
        torch.save(trainer_state, buf)
        fsync_write(tmp / "trainer.pt", buf.getvalue())
        _finish(root, tmp, final, step, config_yaml, tokenizer_json, keep_last)
    dist.barrier()
    return final


def load_shards(path: str | Path, target: dict) -> None:
    """Fill `target` (this run's layout, see `Dist.model_state`) in place from a sharded checkpoint."""
    import torch.distributed.checkpoint as dcp
    import torch.distributed as dist
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(target, storage_reader=dcp.FileSystemReader(str(Path(path) / SHARDS)), no_dist=not dist.is_initialized())


def full_model_tensors(path: str | Path, map_location="cpu") -> dict[str, torch.Tensor]:
    """The full weights of a sharded checkpoint in one process (no process group needed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    reader = dcp.FileSystemReader(str(Path(path) / SHARDS))
    meta = reader.read_metadata().state_dict_metadata
    model = {k[len("model."):]: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
             if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():   # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": model}, storage_reader=reader, no_dist=True)
    return {k: v.to(map_location) for k, v in model.items()}
