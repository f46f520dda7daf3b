"""`DataConfig`: where the text comes from, how it is tokenised and cached."""
from __future__ import annotations

import dataclasses

from ..config import Config, check, check_choice
from .sources import ERRORS


@dataclasses.dataclass
class DataConfig(Config):
    """Options of `prepare_data`. See docs/data.md."""
    train: str = "synthetic"        # "synthetic", a .txt/.jsonl(.gz) file or folder, or "hf:NAME[:SPLIT]"
    valid: str | None = None        # None: synthetic valid split, or hold out `valid_fraction` of `train`
    valid_fraction: float = 0.01    # share of training characters held out (whole documents) when valid is None
    tokenizer: str | None = None    # None: train a byte-level BPE on the training split (cached); else tokenizer.json
    vocab_size: int = 4096          # of the trained BPE (including <|endoftext|>)
    tokenizer_train_chars: int | None = 20_000_000  # BPE trains on a proportional prefix of every document
    seq_len: int = 256              # context length; sequences hold seq_len + 1 tokens
    cache_dir: str | None = None    # None: $COMPETESMOE_CACHE or ~/.cache/competesmoe
    max_train_chars: int | None = None   # use only the first N characters of the training split
    max_train_tokens: int | None = None  # use only the first N training tokens (no re-tokenising)
    errors: str = "strict"          # invalid UTF-8: "strict" raises DataError, "replace" writes U+FFFD
    seed: int = 0                   # shuffle order of the training batches
    progress: bool = True           # tqdm bars while training the tokenizer and tokenising
    # the built-in synthetic corpus (train="synthetic")
    synthetic_topics: int = 8
    synthetic_words: int = 512      # vocabulary size of each topic's made-up language
    synthetic_doc_words: int = 200  # mean document length in words
    synthetic_train_chars: int = 4_000_000
    synthetic_valid_chars: int = 200_000
    synthetic_seed: int = 0

    def validate(self) -> None:
        check(isinstance(self.train, str) and self.train != "", "data.train must be a non-empty string")
        check(self.valid is None or (isinstance(self.valid, str) and self.valid != ""),
              "data.valid must be None or a non-empty string")
        check(0.0 <= self.valid_fraction < 0.5, f"valid_fraction must be in [0, 0.5), got {self.valid_fraction}")
        check(257 <= self.vocab_size <= 1 << 32, f"vocab_size must be in [257, 2**32] (256 bytes + EOS), got {self.vocab_size}")
        check(self.seq_len >= 1, f"seq_len must be >= 1, got {self.seq_len}")
        for name in ("tokenizer_train_chars", "max_train_chars", "max_train_tokens"):
            v = getattr(self, name)
            check(v is None or v >= 1, f"{name} must be None or >= 1, got {v}")
        check_choice("errors", self.errors, ERRORS)
        check(self.seed >= 0 and self.synthetic_seed >= 0, "seeds must be >= 0")
        for name in ("synthetic_topics", "synthetic_words", "synthetic_doc_words",
                     "synthetic_train_chars", "synthetic_valid_chars"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
