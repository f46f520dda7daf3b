"""Reading documents from local files, folders and Hugging Face datasets.

A *source* is a string:
- a file: `.txt` (the whole file is one document), `.jsonl` (one JSON object per line with a
  string `text` field; each line is one document), or either of them gzipped (`.gz`);
- a folder: every such file below it (recursively), in sorted order of relative path;
- `hf:NAME`, `hf:NAME:SPLIT` or `hf:NAME:CONFIG:SPLIT`: `datasets.load_dataset(NAME, CONFIG,
  split=SPLIT)` (split defaults to "train"), using its `text` column.

Bad input raises `DataError` with the file (and line) and the problem.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import CompeteSMoEError

SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")
ERRORS = ("strict", "replace")


class DataError(CompeteSMoEError, ValueError):
    """Unusable input data; the message names the file (and line) and the problem."""


def is_hf(spec: str) -> bool:
    return spec.startswith("hf:")


def _kind(path: Path) -> str | None:
    """'txt' or 'jsonl' for a supported file name, else None."""
    name = path.name.lower().removesuffix(".gz")
    return next((k for k in ("txt", "jsonl") if name.endswith("." + k)), None)


def list_files(spec: str | Path) -> list[Path]:
    """The supported files of a file or folder source, sorted."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and _kind(p)]
        if not files:
            raise DataError(f"{path}: folder has no {', '.join(SUFFIXES)} files")
        return sorted(files, key=lambda p: p.relative_to(path).as_posix())
    if _kind(path) is None:
        raise DataError(f"{path}: unsupported file type; expected one of {', '.join(SUFFIXES)}")
    return [path]


def fingerprint(spec: str) -> str:
    """A content hash of a file/folder source (names + bytes), or the spec itself for `hf:`."""
    if is_hf(spec):
        return spec
    h = hashlib.sha256()
    path = Path(spec).expanduser()
    for f in list_files(spec):
        h.update(f.relative_to(path).as_posix().encode() if path.is_dir() else f.name.encode())
        h.update(b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def read_documents(spec: str, errors: str = "strict") -> list[str]:
    """All non-empty documents of a source, in order.

    `errors="replace"` substitutes U+FFFD for invalid UTF-8 instead of raising.
    """
    if errors not in ERRORS:
        raise DataError(f"errors={errors!r} is not one of {ERRORS}")
    if is_hf(spec):
        return _read_hf(spec)
    docs: list[str] = []
    for f in list_files(spec):
        docs.extend(read_file(f, errors))
    return docs


def read_file(path: Path, errors: str = "strict") -> list[str]:
    """The documents of one `.txt`/`.jsonl` (optionally `.gz`) file."""
    path = Path(path)
    raw = _read_bytes(path)
    if not raw or raw.isspace():
        raise DataError(f"{path}: file is empty")
    nul = raw.find(b"\0")
    if nul >= 0:
        raise DataError(f"{path}: looks like a binary file (NUL byte at offset {nul}); expected UTF-8 text")
    try:
        text = raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}: line {line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                        "fix the file or pass errors='replace' to substitute U+FFFD") from None
    if _kind(path) == "txt":
        docs = [text] if text.strip() else []
    else:
        docs = _parse_jsonl(path, text)
    if not docs:
        raise DataError(f"{path}: no text (every document is empty)")
    return docs


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a valid gzip file ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def jsonl_values(path: Path, lines: Iterable[str], error: type[Exception] = DataError) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of JSON Lines text, lazily; a line that is not
    JSON raises `error` naming the file and line."""
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}: line {i}: not valid JSON ({e.msg} at column {e.colno})") from None


def _parse_jsonl(path: Path, text: str) -> list[str]:
    docs = []
    for i, obj in jsonl_values(path, text.split("\n")):  # not splitlines(): JSON strings may hold U+2028
        if not isinstance(obj, dict) or "text" not in obj:
            raise DataError(f"{path}: line {i}: no 'text' field (expected an object like {{\"text\": \"...\"}})")
        if not isinstance(obj["text"], str):
            raise DataError(f"{path}: line {i}: 'text' is {type(obj['text']).__name__}, expected a string")
        if obj["text"].strip():
            docs.append(obj["text"])
    return docs


def _read_hf(spec: str) -> list[str]:
    parts = spec[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise DataError(f"{spec!r}: expected hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    name, config, split = parts[0], (parts[1] if len(parts) == 3 else None), (parts[-1] if len(parts) > 1 else "train")
    try:
        import datasets  # optional dependency, imported only here
    except ImportError:
        raise DataError(f"{spec}: reading Hugging Face datasets needs the optional 'datasets' package "
                        "(pip install 'competesmoe[data]'); or pass a local .txt/.jsonl path") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network, unknown name, unknown split: all reported the same way
        raise DataError(f"{spec}: cannot load Hugging Face dataset {name!r} (config {config!r}, split {split!r}): "
                        f"{type(e).__name__}: {e}. This needs network access or a local Hugging Face cache.") from e
    if "text" not in ds.column_names:
        raise DataError(f"{spec}: dataset has no 'text' column (columns: {ds.column_names})")
    docs = [t for t in ds["text"] if isinstance(t, str) and t.strip()]
    if not docs:
        raise DataError(f"{spec}: no text (every document is empty)")
    return docs
