"""`prepare_data(cfg)`: documents -> cached BPE tokenizer -> cached token arrays -> batch iterators.

Caches live under `cache_dir`:
  tokenizers/<key>/tokenizer.json   key = hash(training split before max_train_chars, vocab_size, tokenizer_train_chars)
  tokens/<key>.npy (+ .json)        key = hash(split identity, tokenizer hash)
A split's identity is a content hash of its files (or the synthetic parameters, or the `hf:` name)
plus the options that change its text, so nothing is read or tokenised again on a second run.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tokenizers import Tokenizer

from .batches import BatchIterator, SequentialBatches
from .cache import atomic_save_array, atomic_write_text, content_key, default_cache_dir, load_array
from .config import DataConfig
from .sources import DataError, fingerprint, read_documents
from .synthetic import SyntheticCorpus
from .tokenizer import cached_tokenizer, encode_documents, eos_id, load_tokenizer, tokenizer_hash

VERSION = 1  # bump when the pipeline's output changes (invalidates caches)


@dataclasses.dataclass
class PreparedData:
    """A tokenizer and the tokenised splits (memory-mapped), with iterator constructors."""
    config: DataConfig
    tokenizer: Tokenizer
    train: np.ndarray
    valid: np.ndarray | None
    eos_id: int
    info: dict[str, Any]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def train_batches(self, batch_size: int, seed: int | None = None) -> BatchIterator:
        """Endless shuffled training batches `LongTensor[batch_size, seq_len + 1]` (resumable)."""
        return BatchIterator(self.train, self.config.seq_len, batch_size,
                             self.config.seed if seed is None else seed)

    def valid_batches(self, batch_size: int, max_batches: int | None = None) -> SequentialBatches:
        """Validation batches in fixed order (re-iterable)."""
        if self.valid is None:
            raise DataError("no validation split (set data.valid, or data.valid_fraction > 0)")
        return SequentialBatches(self.valid, self.config.seq_len, batch_size, max_batches)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def prepare_data(cfg: DataConfig, log: Callable[[str], None] = print) -> PreparedData:
    """Build or load the tokenizer and token arrays that `cfg` describes."""
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    splits = _Splits(cfg)
    info: dict[str, Any] = {"cache_dir": str(cache)}

    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
        info["tokenizer"] = str(cfg.tokenizer)
    else:
        # trained on the whole training split (not capped by max_train_chars), so slices share a vocabulary
        key = content_key("tokenizer", {**splits.train_id, "max_chars": None}, cfg.vocab_size,
                          cfg.tokenizer_train_chars, VERSION)
        path = cache / "tokenizers" / key / "tokenizer.json"
        fresh, t0 = not path.is_file(), time.perf_counter()
        tok = cached_tokenizer(cache, key, lambda: _sample(splits.uncapped_train_docs(), cfg.tokenizer_train_chars),
                               cfg.vocab_size, cfg.progress)
        info["tokenizer"] = str(path)
        if fresh:
            log(f"data: trained a {tok.get_vocab_size()}-token BPE in {time.perf_counter() - t0:.1f}s -> {path}")
    eos = eos_id(tok)
    tok_hash = tokenizer_hash(tok)

    train = _cached_tokens(cache, "train", splits.train_id, tok_hash, splits.train_docs, tok, eos, cfg.progress, log)
    valid = None
    if splits.valid_id is not None:
        valid = _cached_tokens(cache, "valid", splits.valid_id, tok_hash, splits.valid_docs, tok, eos, cfg.progress, log)
    if cfg.max_train_tokens is not None:
        train = train[:cfg.max_train_tokens]
    info.update(train_tokens=len(train), valid_tokens=0 if valid is None else len(valid))
    return PreparedData(cfg, tok, train, valid, eos, info)


def _cached_tokens(cache: Path, name: str, split_id: dict, tok_hash: str, docs: Callable[[], list[str]],
                   tok: Tokenizer, eos: int, progress: bool, log: Callable[[str], None]) -> np.ndarray:
    path = cache / "tokens" / f"{content_key(name, split_id, tok_hash, VERSION)}.npy"
    tokens = load_array(path)
    if tokens is not None:
        return tokens
    t0 = time.perf_counter()
    texts = docs()
    array = encode_documents(tok, texts, eos, progress, desc=f"tokenising {name}")
    atomic_write_text(path.with_suffix(".json"), json.dumps(
        {"split": name, "identity": split_id, "tokenizer": tok_hash, "documents": len(texts),
         "chars": sum(map(len, texts)), "tokens": len(array), "dtype": str(array.dtype)}, indent=1, default=str))
    atomic_save_array(path, array)
    log(f"data: tokenised {name}: {len(texts)} documents -> {len(array):,} tokens in {time.perf_counter() - t0:.1f}s")
    return np.load(path, mmap_mode="r")


class _Splits:
    """The train/valid documents a config asks for: cheap identities now, text read on demand."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.synth = SyntheticCorpus(n_topics=cfg.synthetic_topics, words_per_topic=cfg.synthetic_words,
                                     doc_words=cfg.synthetic_doc_words, seed=cfg.synthetic_seed)
        self.holdout = cfg.valid is None and cfg.train != "synthetic" and cfg.valid_fraction > 0
        common = {"errors": cfg.errors, "version": VERSION}
        self.train_id = {"source": self._identity(cfg.train, "train"), "max_chars": cfg.max_train_chars,
                         "holdout": cfg.valid_fraction if self.holdout else None, **common}
        if cfg.valid is not None:
            self.valid_id: dict | None = {"source": self._identity(cfg.valid, "valid"), **common}
        elif cfg.train == "synthetic":
            self.valid_id = {"source": self._identity("synthetic", "valid"), **common}
        elif self.holdout:
            self.valid_id = {"source": self.train_id["source"], "heldout": cfg.valid_fraction, **common}
        else:
            self.valid_id = None

    def _identity(self, spec: str, split: str) -> Any:
        if spec == "synthetic":
            chars = self.cfg.synthetic_train_chars if split == "train" else self.cfg.synthetic_valid_chars
            return {**self.synth.identity(), "split": split, "chars": chars}
        return fingerprint(spec)

    def _read(self, spec: str, split: str) -> list[str]:
        if spec == "synthetic":
            chars = self.cfg.synthetic_train_chars if split == "train" else self.cfg.synthetic_valid_chars
            return self.synth.generate(split, chars)[0]
        return read_documents(spec, self.cfg.errors)

    @functools.cache
    def _train_all(self) -> list[str]:
        return self._read(self.cfg.train, "train")

    @functools.cache
    def _held_out(self) -> tuple[list[str], list[str]]:
        return holdout(self._train_all(), self.cfg.valid_fraction)

    def uncapped_train_docs(self) -> list[str]:
        return self._held_out()[0] if self.holdout else self._train_all()

    def train_docs(self) -> list[str]:
        return _prefix(self.uncapped_train_docs(), self.cfg.max_train_chars)

    def valid_docs(self) -> list[str]:
        if self.cfg.valid is not None:
            return self._read(self.cfg.valid, "valid")
        if self.cfg.train == "synthetic":
            return self._read("synthetic", "valid")
        return self._held_out()[1]


def holdout(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """Split into (train, valid): valid gets whole documents, picked in a fixed random order, until it
    holds `fraction` of the characters (at least one; train keeps at least one). A single document is
    cut instead: its last `fraction` of characters become valid. Both keep the original order."""
    if len(docs) == 1:
        cut = int(len(docs[0]) * (1 - fraction))
        if cut == len(docs[0]) or cut == 0:
            raise DataError(f"cannot hold out {fraction:.1%} of a single {len(docs[0])}-character document; pass data.valid")
        return [docs[0][:cut]], [docs[0][cut:]]
    target = fraction * sum(map(len, docs))
    picked: set[int] = set()
    chars = 0
    for i in np.random.default_rng(0).permutation(len(docs)).tolist():
        if (chars >= target and picked) or len(picked) == len(docs) - 1:
            break
        picked.add(i)
        chars += len(docs[i])
    return ([d for i, d in enumerate(docs) if i not in picked], [d for i, d in enumerate(docs) if i in picked])


def _prefix(docs: list[str], max_chars: int | None) -> list[str]:
    """The first `max_chars` characters of the documents (the last one cut)."""
    if max_chars is None:
        return docs
    out, total = [], 0
    for d in docs:
        if total >= max_chars:
            break
        out.append(d[:max_chars - total])
        total += len(out[-1])
    return out


def _sample(docs: list[str], max_chars: int | None) -> list[str]:
    """About `max_chars` characters for tokenizer training: the same leading share of every document,
    so every document (author, topic) is represented."""
    total = sum(map(len, docs))
    if max_chars is None or total <= max_chars:
        return docs
    share = max_chars / total
    return [d[:max(1, int(len(d) * share))] for d in docs]
