"""Packing a token stream into fixed-length sequences, and iterating over batches of them.

The stream (documents joined by EOS) is cut into `n = (len(tokens) - 1) // seq_len` sequences of
`seq_len + 1` tokens; sequence `i` is `tokens[i*seq_len : i*seq_len + seq_len + 1]`, so consecutive
sequences share one token and every token after the first is a target exactly once. A batch is a
`torch.LongTensor[batch, seq_len + 1]`; use `x, y = b[:, :-1], b[:, 1:]` (or `model(**model_inputs(b))`).
Batches of whole samples (images and text, `data.llava`) reuse the same order and resumable position.
"""
from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np
import torch

from .sources import DataError


def model_inputs(batch: torch.Tensor | dict[str, torch.Tensor], device: Any = None) -> dict[str, torch.Tensor]:
    """A batch as the model's keyword arguments, on `device`: packed tokens [B, S + 1] become input_ids
    [:, :-1] and targets [:, 1:] (negative ~id tokens: no target, `data.chat`); a batch of whole samples
    (a dict: input_ids, targets, attention_mask, pixel_values, `data.llava`) is passed as it is."""
    if isinstance(batch, dict):
        return {k: v.to(device) if device is not None else v for k, v in batch.items()}
    batch = batch.to(device) if device is not None else batch
    return {"input_ids": batch[:, :-1], "targets": batch[:, 1:]}


def num_sequences(n_tokens: int, seq_len: int) -> int:
    return max(0, (n_tokens - 1) // seq_len)


def gather(tokens: np.ndarray, index: np.ndarray, seq_len: int) -> torch.Tensor:
    """The packed sequences `index` of `tokens` as a LongTensor[len(index), seq_len + 1]."""
    offsets = np.asarray(index, dtype=np.int64)[:, None] * seq_len + np.arange(seq_len + 1)
    return torch.from_numpy(np.asarray(tokens[offsets], dtype=np.int64))


def packed(tokens: np.ndarray | torch.Tensor, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Every packed sequence of a token stream, in order: LongTensor[n, seq_len + 1]; with `max_tokens`,
    only the first sequences that predict (about) that many tokens."""
    tokens = tokens.numpy(force=True).reshape(-1) if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    n = _check_size(tokens, seq_len, "token stream")
    if max_tokens is not None:
        n = min(n, max(1, math.ceil(max_tokens / seq_len)))
    return gather(tokens, np.arange(n), seq_len)


def _check_size(tokens: np.ndarray, seq_len: int, what: str) -> int:
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}")
    n = num_sequences(len(tokens), seq_len)
    if n < 1:
        raise DataError(f"{what}: {len(tokens)} tokens are too few for one sequence of seq_len + 1 = {seq_len + 1}")
    return n


class BatchIterator:
    """Endless batches of packed sequences in a seeded shuffled order, epoch after epoch.

    Epoch `e` visits every sequence once, in the order `default_rng([seed, e]).permutation(n)`;
    the epochs form one continuous stream, so a batch may straddle two epochs and no sequence is
    dropped. `state_dict()` captures the exact position; loading it into a fresh iterator over the
    same tokens replays exactly the batches an uninterrupted iterator would yield.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int = 0):
        self.tokens, self.seq_len = tokens, seq_len
        self._start(_check_size(tokens, seq_len, "training split"), batch_size, seed)

    def _start(self, n_sequences: int, batch_size: int, seed: int) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.n_sequences, self.batch_size, self.seed = n_sequences, batch_size, seed
        self.epoch = 0
        self.index = 0  # next position within the epoch's permutation
        self._perm: tuple[int, np.ndarray] | None = None

    @property
    def batches_per_epoch(self) -> float:
        return self.n_sequences / self.batch_size

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_sequences))
        return self._perm[1]

    def next_indices(self) -> np.ndarray:
        """The sequence indices of the next batch (advances the position)."""
        out = np.empty(self.batch_size, dtype=np.int64)
        filled = 0
        while filled < self.batch_size:
            take = min(self.batch_size - filled, self.n_sequences - self.index)
            out[filled:filled + take] = self.permutation(self.epoch)[self.index:self.index + take]
            filled += take
            self.index += take
            if self.index == self.n_sequences:
                self.epoch, self.index = self.epoch + 1, 0
        return out

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        return self.take(self.next_indices())

    def take(self, index: np.ndarray) -> torch.Tensor:
        """The batch of sequences `index`."""
        return gather(self.tokens, index, self.seq_len)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "index": self.index,
                "n_sequences": self.n_sequences, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("n_sequences", "seq_len"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(f"cannot resume: the saved data position has {key}={state[key]} but the data now has "
                                f"{getattr(self, key)} (different data, tokenizer or seq_len)")
        if not 0 <= state["index"] < self.n_sequences or state["epoch"] < 0:
            raise DataError(f"cannot resume: invalid position epoch={state['epoch']} index={state['index']}")
        self.seed, self.epoch, self.index = int(state["seed"]), int(state["epoch"]), int(state["index"])


class SequentialBatches:
    """Batches of packed sequences in fixed order (for validation); the last one may be smaller.

    Re-iterable: every `iter()` starts again from the first sequence.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int | None = None):
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.n_sequences = _check_size(tokens, seq_len, "validation split")
        n = math.ceil(self.n_sequences / batch_size)
        self.n_batches = n if max_batches is None else min(n, max_batches)

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[torch.Tensor]:
        for b in range(self.n_batches):
            index = np.arange(b * self.batch_size, min((b + 1) * self.batch_size, self.n_sequences))
            yield gather(self.tokens, index, self.seq_len)


class RankShard:
    """Rank `rank` of `world`'s rows of every batch of a `BatchIterator`: rows [rank·b/P, (rank+1)·b/P).

    Every rank advances the same global iterator (indices only), so the global batch is the config's
    whatever P is, the data position is the same on every rank (a run resumes with another P), and each
    rank reads only its own rows.
    """

    def __init__(self, batches: BatchIterator, rank: int, world: int):
        if batches.batch_size % world:
            raise DataError(f"train.batch_size={batches.batch_size} (the global micro-batch) must be divisible by "
                            f"the {world} processes")
        self.batches, self.rank, self.world = batches, rank, world
        self.batch_size = batches.batch_size // world

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        mine = self.batches.next_indices()[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return self.batches.take(mine)

    def state_dict(self) -> dict[str, Any]:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state)
