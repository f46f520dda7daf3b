"""Fine-tuning data for Hugging Face tokenizers: plain text, or chat jsonl with the loss on replies only.

* text: `.txt`/`.jsonl(.gz)` files or folders (as `data.sources` reads them), each document tokenised
  with the model's tokenizer and followed by its EOS token;
* chat: jsonl lines `{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}`
  rendered with the tokenizer's chat template. Only the assistant replies are targets: for reply i the
  targets are the tokens of render(messages[:i+1]) after render(messages[:i], add_generation_prompt=True).

Examples are packed into one stream (each followed by EOS: a target after text, not after a chat) and cut into sequences like pre-training data
(`data.batches`). A token that is not a target is stored as `~id` (a negative number), so a batch stays one
LongTensor; `unmask(batch[:, :-1], batch[:, 1:])` (what `HFCausalLM` does with what the trainer passes it)
gives the input ids and the targets with -100 where no loss is taken.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .batches import BatchIterator, SequentialBatches, num_sequences
from .config import DataConfig
from .prepare import holdout
from .sources import DataError, list_files, read_documents


def unmask(inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's view of `batch[:, :-1], batch[:, 1:]`: ~id inputs back to ids, ~id targets to -100."""
    return torch.where(inputs < 0, ~inputs, inputs), targets.masked_fill(targets < 0, -100)


def lm_pair(batch_BS1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids [B, S], targets [B, S]) of a batch of S+1 tokens; negative (~id) tokens are no target."""
    return unmask(batch_BS1[:, :-1], batch_BS1[:, 1:])


def _tokens(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_chat(tokenizer: Any, messages: list[dict], where: str = "example") -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it is a target (assistant reply)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("the tokenizer has no chat template (tokenizer_config.json 'chat_template' or "
                        "chat_template.jinja): chat data needs one")
    render = lambda msgs, gen=False: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    ids = _tokens(tokenizer, render(messages))
    mask = [False] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_tokens(tokenizer, render(messages[:i], True)))
        upto = _tokens(tokenizer, render(messages[:i + 1]))
        if ids[:len(upto)] != upto or start > len(upto):
            raise DataError(f"{where}: the chat template does not render message {i} as a continuation of the "
                            f"messages before it (tokens differ), so its reply tokens cannot be located")
        mask[start:len(upto)] = [True] * (len(upto) - start)
    return ids, mask


def read_chat(spec: str | Path) -> list[tuple[str, list[dict]]]:
    """(where, messages) of every line of the chat jsonl files in `spec` (a file or folder)."""
    out = []
    for path in list_files(spec):
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}: line {n}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
                out.append((where, _messages(obj, where)))
    if not out:
        raise DataError(f"{spec}: no chat examples")
    return out


def _messages(obj: Any, where: str) -> list[dict]:
    msgs = obj.get("messages") if isinstance(obj, dict) else None
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: expected an object like {{\"messages\": [{{\"role\": ..., \"content\": ...}}]}}")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} needs string 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: no assistant message, so nothing to learn from")
    return msgs


def pack(examples: list[tuple[list[int], list[bool]]], eos: int, eos_target: bool) -> np.ndarray:
    """One int64 stream: each example then EOS (a target or not); non-targets stored as ~id."""
    parts = []
    for ids, mask in examples:
        a = np.asarray(ids + [eos], dtype=np.int64)
        keep = np.asarray(mask + [eos_target], dtype=bool)
        parts.append(np.where(keep, a, ~a))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


@dataclasses.dataclass
class FinetuneData:
    """What `Trainer` needs from its data: a `tokenizers.Tokenizer`, its vocabulary size and batches."""
    hf_tokenizer: Any
    train: np.ndarray
    valid: np.ndarray | None
    seq_len: int

    @property
    def tokenizer(self):
        return self.hf_tokenizer.backend_tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self.hf_tokenizer)

    @property
    def n_train(self) -> int:
        """Training sequences (an epoch's)."""
        return num_sequences(len(self.train), self.seq_len)

    def train_batches(self, batch_size: int, seed: int = 0) -> BatchIterator:
        return BatchIterator(self.train, self.seq_len, batch_size, seed)

    def valid_batches(self, batch_size: int, max_batches: int | None = None) -> SequentialBatches:
        if self.valid is None:
            raise DataError("no validation split (set data.valid, or data.valid_fraction > 0)")
        return SequentialBatches(self.valid, self.seq_len, batch_size, max_batches)


def load_finetune_data(cfg: DataConfig, tokenizer: Any, chat: bool = False) -> FinetuneData:
    """Tokenise `cfg.train` (and `cfg.valid`, or a held-out `valid_fraction`) with a transformers tokenizer."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token (eos_token), which separates the packed examples")

    def encode(items: list) -> np.ndarray:
        if chat:
            return pack([encode_chat(tokenizer, msgs, where) for where, msgs in items], eos, eos_target=False)
        return pack([(ids, [True] * len(ids)) for ids in (_tokens(tokenizer, d) for d in items)], eos, eos_target=True)

    items = read_chat(cfg.train) if chat else read_documents(cfg.train, cfg.errors)
    if cfg.valid is not None:
        valid_items = read_chat(cfg.valid) if chat else read_documents(cfg.valid, cfg.errors)
    elif cfg.valid_fraction > 0:
        if chat and len(items) < 2:
            raise DataError(f"{cfg.train}: one chat example cannot be split into train and validation; pass data.valid")
        items, valid_items = holdout(items, cfg.valid_fraction)
    else:
        valid_items = []
    return FinetuneData(tokenizer, encode(items), encode(valid_items) if valid_items else None, cfg.seq_len)
