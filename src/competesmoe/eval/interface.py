"""What the evaluation engine needs from a model and a tokenizer, and adapters for common ones.

A model is anything callable as `model(input_ids_BS) -> logits_BSV` (a tensor, or an object with
`.logits`, or a tuple whose first item is the logits) with `max_length` and `eos_token_id`
attributes. Those two can also be passed to `evaluate` directly, so a plain `nn.Module` works.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from ..data.tokenizer import EOS


@runtime_checkable
class LogitsModel(Protocol):
    """A causal LM: next-token logits for every position of a right-padded batch."""

    max_length: int
    eos_token_id: int

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B, S] long -> [B, S, V]
        ...


@runtime_checkable
class TextTokenizer(Protocol):
    """Text -> token ids, without special tokens (no BOS/EOS added)."""

    def encode(self, text: str) -> list[int]:
        ...


class TokenizersAdapter:
    """Wraps a `tokenizers.Tokenizer`; `eos_token` names the token used as the empty-context prefix."""

    def __init__(self, tokenizer: Any, eos_token: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.eos_token_id: int | None = None
        candidates = [eos_token] if eos_token else [EOS, "</s>", "<eos>", "<|eos|>", "<s>", "<bos>"]
        for tok in candidates:
            tid = tokenizer.token_to_id(tok)
            if tid is not None:
                self.eos_token_id = int(tid)
                break
        if eos_token and self.eos_token_id is None:
            raise ValueError(f"eos token {eos_token!r} is not in the tokenizer's vocabulary")

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)


class HFTokenizerAdapter:
    """Wraps a transformers tokenizer (`PreTrainedTokenizerBase`)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_token_id: int | None = None if eos is None else int(eos)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))


def as_tokenizer(tokenizer: Any) -> TextTokenizer:
    """Wrap a `tokenizers.Tokenizer` or a transformers tokenizer; anything else must already
    have `encode(text) -> list[int]`."""
    if isinstance(tokenizer, (TokenizersAdapter, HFTokenizerAdapter)):
        return tokenizer
    try:
        import tokenizers
        if isinstance(tokenizer, tokenizers.Tokenizer):
            return TokenizersAdapter(tokenizer)
    except ImportError:  # pragma: no cover
        pass
    if type(tokenizer).__module__.startswith("transformers") and hasattr(tokenizer, "eos_token_id"):
        return HFTokenizerAdapter(tokenizer)
    if not callable(getattr(tokenizer, "encode", None)):
        raise TypeError(f"{type(tokenizer).__name__} has no encode(text) -> list[int]")
    return tokenizer


def model_device(model: Any, device: str | torch.device | None = None) -> torch.device:
    """`device` if given, else the device of the model's first parameter (CPU if it has none)."""
    if device is not None:
        return torch.device(device)
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def logits_of(output: Any) -> torch.Tensor:
    """The logits tensor out of a model's return value (tensor, `.logits`, or tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    if getattr(output, "logits", None) is not None:
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")
