"""Cache directory, content keys and atomic writes.

Every cached file is written to a hidden temporary name in the same folder, flushed, fsync'ed and
then renamed over its final name, so an interrupted run leaves either no entry or a complete one;
stray temporaries are never read.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np


def default_cache_dir() -> Path:
    """`$COMPETESMOE_CACHE`, else `~/.cache/competesmoe`."""
    return Path(os.environ.get("COMPETESMOE_CACHE") or Path.home() / ".cache" / "competesmoe").expanduser()


def content_key(*parts: Any) -> str:
    """A short stable hash of JSON-able parts."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _commit(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save_array(path: Path, array: np.ndarray) -> None:
    """Write `array` as `.npy` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_array(path: Path) -> np.ndarray | None:
    """The memory-mapped array at `path`, or None when absent or unreadable (then rebuilt)."""
    if not path.is_file():
        return None
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError):
        return None
