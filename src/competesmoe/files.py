"""Durable, atomic file writes: the one home for "write to a temporary name, fsync, rename into place".

A crash leaves either the old content (or nothing) or the complete new one, never a half-written file or
folder; temporary names start with "." and are never read. Used by the data cache, checkpoints, run
summaries and the final Hugging Face folder of `finetune`.
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable


def fsync_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` and flush it to disk (no rename: for files inside a temporary folder)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make the entries of folder `path` (renames, new files) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_dirs(root: Path) -> None:
    """`fsync_dir` on every folder below `root` and on `root` itself (before it is renamed into place)."""
    for d in [p for p in root.rglob("*") if p.is_dir()] + [root]:
        fsync_dir(d)


def temporary_name(path: Path) -> Path:
    """A hidden, unique name next to `path`."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write(path: str | Path, data: bytes | str | Callable[[Path], None]) -> Path:
    """`path` gets `data` (bytes, text, or a function that writes the file it is given) all at once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        if callable(data):
            data(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        else:
            fsync_write(tmp, data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_folder(path: str | Path, fill: Callable[[Path], None]) -> Path:
    """Folder `path` gets what `fill(tmp)` writes into a fresh temporary folder, all at once; a folder already
    at `path` is replaced (moved aside, then deleted, after the new one is in place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    tmp.mkdir()
    try:
        fill(tmp)
        for f in [p for p in tmp.rglob("*") if p.is_file()]:
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        fsync_dirs(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{time.time_ns()}")
            path.rename(old)
        tmp.rename(path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
