"""Cache directory, content keys and atomic writes.

Every cached file is written atomically (`competesmoe.files.atomic_write`: a hidden temporary name in the
same folder, fsync'ed, then renamed over its final name), so an interrupted run leaves either no entry or a
complete one; stray temporaries are never read.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_write


def default_cache_dir() -> Path:
    """`$COMPETESMOE_CACHE`, else `~/.cache/competesmoe`."""
    return Path(os.environ.get("COMPETESMOE_CACHE") or Path.home() / ".cache" / "competesmoe").expanduser()


def content_key(*parts: Any) -> str:
    """A short stable hash of JSON-able parts."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, text)


def atomic_save_array(path: Path, array: np.ndarray) -> None:
    """Write `array` as `.npy` atomically."""
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
    atomic_write(path, save)


def load_array(path: Path) -> np.ndarray | None:
    """The memory-mapped array at `path`, or None when absent or unreadable (then rebuilt)."""
    if not path.is_file():
        return None
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError):
        return None
