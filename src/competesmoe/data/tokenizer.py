"""Byte-level BPE tokenizers: training, caching by content key, loading, and tokenising to arrays."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm

from .cache import atomic_write_text
from .sources import DataError

EOS = "<|endoftext|>"
_ENCODE_BATCH_CHARS = 1 << 21  # characters per encode_batch call (progress granularity)


def train_bpe(texts: Sequence[str], vocab_size: int, progress: bool = False) -> Tokenizer:
    """Train a GPT-2-style byte-level BPE (no normaliser, exact round trip) with `EOS` as id 0."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a `tokenizer.json` (a file, or a folder holding one)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"{path}: tokenizer file not found")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a plain Exception on malformed files
        raise DataError(f"{path}: not a valid tokenizer.json ({e})") from None


def tokenizer_hash(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()[:20]


def eos_id(tok: Tokenizer, token: str = EOS) -> int:
    i = tok.token_to_id(token)
    if i is None:
        raise DataError(f"tokenizer has no {token!r} token, which is used as the document separator")
    return i


def cached_tokenizer(cache_dir: Path, key: str, texts, vocab_size: int, progress: bool = False) -> Tokenizer:
    """Load the tokenizer cached under `key`, or train one on `texts()` and cache it."""
    path = Path(cache_dir) / "tokenizers" / key / "tokenizer.json"
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception:
            pass  # unreadable: retrain and overwrite
    tok = train_bpe(texts(), vocab_size, progress)
    atomic_write_text(path, tok.to_str())
    return tok


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def encode_documents(tok: Tokenizer, docs: Sequence[str], eos: int, progress: bool = False,
                     desc: str = "tokenising") -> np.ndarray:
    """All documents tokenised and joined, each followed by `eos`: doc0 EOS doc1 EOS ..."""
    dtype = token_dtype(tok.get_vocab_size())
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # same ids, no offsets
    sep = np.array([eos], dtype=dtype)
    chunks: list[np.ndarray] = []
    with tqdm(total=sum(map(len, docs)), unit="char", unit_scale=True, desc=desc, disable=not progress) as bar:
        for batch in _batches(docs):
            for enc in encode(batch, add_special_tokens=False):
                chunks += [np.asarray(enc.ids, dtype=dtype), sep]
            bar.update(sum(map(len, batch)))
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype)


def _batches(docs: Sequence[str]):
    batch: list[str] = []
    size = 0
    for d in docs:
        batch.append(d)
        size += len(d)
        if size >= _ENCODE_BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch

