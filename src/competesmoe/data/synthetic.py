"""A deterministic synthetic corpus: several made-up "languages", one per topic.

Each topic has its own letters, its own vocabulary of invented words, a few capitalised
sentence-starting words, and a sparse first-order Markov chain over its words (every word has
`branch` likely successors with Zipf weights). Documents are written in a single topic, so a router
has something to specialise on, and the next word is far more predictable than its unigram
frequency suggests (about 2.5 bits/word versus about log2(words) bits), so a small model's loss can
fall clearly below the unigram entropy. Everything is a pure function of the parameters and seed.
"""
from __future__ import annotations

import dataclasses

import numpy as np

VERSION = 1  # bump when the generator's output changes (invalidates caches)
SPLITS = {"train": 0, "valid": 1, "test": 2}
_CONSONANTS = "bcdfghjklmnpqrstvwxz"
_VOWELS = "aeiouy"


@dataclasses.dataclass(frozen=True)
class SyntheticCorpus:
    """Parameters of the generated corpus; `generate(split, n_chars)` writes its documents."""
    n_topics: int = 8
    words_per_topic: int = 512
    doc_words: int = 200            # mean document length in words (uniform in [0.5, 1.5] x this)
    branch: int = 8                 # successors per word in a topic's Markov chain
    sentence_end: float = 0.08      # probability that a sentence ends after a word
    seed: int = 0

    def identity(self) -> dict:
        return {"synthetic": dataclasses.asdict(self), "version": VERSION}

    def topic(self, t: int) -> "_Topic":
        return _Topic.make(self, t)

    def generate(self, split: str = "train", n_chars: int = 4_000_000) -> tuple[list[str], list[int]]:
        """Documents (at least `n_chars` characters in all, whole documents) and their topic ids."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {tuple(SPLITS)}")
        topics = [self.topic(t) for t in range(self.n_topics)]
        rng = np.random.default_rng([self.seed, SPLITS[split], 0x5EED])
        per_round = max(16, n_chars // (6 * self.doc_words) // 4)
        docs: list[str] = []
        labels: list[int] = []
        total = 0
        while total < n_chars:
            doc_topics = rng.integers(self.n_topics, size=per_round)
            lengths = rng.integers(max(1, self.doc_words // 2), self.doc_words * 3 // 2 + 1, size=per_round)
            texts: list[str] = [""] * per_round
            for t, topic in enumerate(topics):
                idx = np.flatnonzero(doc_topics == t)
                for i, text in zip(idx, topic.sample(rng, lengths[idx])):
                    texts[i] = text
            for text, t in zip(texts, doc_topics.tolist()):
                if total >= n_chars:
                    break
                docs.append(text)
                labels.append(t)
                total += len(text)
        return docs, labels


@dataclasses.dataclass
class _Topic:
    words: np.ndarray       # object array: index 0 is ".", then the vocabulary, then capitalised starters
    successors: np.ndarray  # [n_words, branch] indices into `words`
    starters: np.ndarray    # indices of the capitalised sentence starters
    cum: np.ndarray         # cumulative Zipf weights over the `branch` successors
    sentence_end: float

    @classmethod
    def make(cls, c: SyntheticCorpus, t: int) -> "_Topic":
        rng = np.random.default_rng([c.seed, t, 0x70C])
        cons = rng.choice(list(_CONSONANTS), size=6, replace=False)
        vows = rng.choice(list(_VOWELS), size=3, replace=False)
        vocab: set[str] = set()
        while len(vocab) < c.words_per_topic:
            syllables = rng.integers(1, 4)
            vocab.add("".join(rng.choice(cons) + rng.choice(vows) + (rng.choice(cons) if rng.random() < 0.3 else "")
                              for _ in range(syllables)))
        vocab_list = sorted(vocab)
        rng.shuffle(vocab_list)
        n_start = min(16, c.words_per_topic)
        words = np.array(["."] + vocab_list + [w.capitalize() for w in vocab_list[:n_start]], dtype=object)
        n = 1 + c.words_per_topic
        successors = rng.integers(1, n, size=(len(words), c.branch))
        weights = 1.0 / np.arange(1, c.branch + 1)
        return cls(words, successors, np.arange(n, n + n_start), np.cumsum(weights / weights.sum()), c.sentence_end)

    def sample(self, rng: np.random.Generator, lengths: np.ndarray) -> list[str]:
        """One document per entry of `lengths` (in words), all chains stepped in parallel."""
        if len(lengths) == 0:
            return []
        steps = int(lengths.max())
        out = np.empty((len(lengths), steps), dtype=np.int64)
        state = np.zeros(len(lengths), dtype=np.int64)  # every document starts a sentence
        cum_start = np.linspace(0, 1, len(self.starters) + 1)[1:]
        for s in range(steps):
            u = rng.random(len(lengths))
            nxt = self.successors[state, np.minimum(np.searchsorted(self.cum, u), len(self.cum) - 1)]
            nxt = np.where(rng.random(len(lengths)) < self.sentence_end, 0, nxt)
            start = self.starters[np.minimum(np.searchsorted(cum_start, u), len(self.starters) - 1)]
            state = np.where(state == 0, start, nxt)
            out[:, s] = state
        docs = []
        for row, n in zip(out, lengths.tolist()):
            text = " ".join(self.words[row[:n]].tolist()).replace(" .", ".")
            docs.append(text if text.endswith(".") else text + ".")
        return docs
