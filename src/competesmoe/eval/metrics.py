"""Per-task metrics on top of a `Scorer`, with lm-evaluation-harness's definitions.

Accuracies are fractions in [0, 1]; `*_stderr` is the standard error of the mean (sample std / sqrt(n)).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from .scoring import Scorer
from .tasks import BlimpPair, ChoiceItem, LambadaItem, count_words, wikitext_detokenize


def mean_stderr(values: Sequence[float]) -> float:
    """lm-eval's `mean_stderr`: sample standard deviation / sqrt(n) (0 for n < 2)."""
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def multiple_choice(scorer: Scorer, items: Sequence[ChoiceItem], desc: str = "multiple choice") -> dict[str, Any]:
    """`acc`: argmax of sum log-likelihood of `" " + choice`; `acc_norm`: of ll / len(choice) in
    characters (lm-eval's definition); `acc_bytes`: of ll / len(choice) in UTF-8 bytes."""
    pairs = [(item.context, " " + choice) for item in items for choice in item.choices]
    lls = [ll for ll, _ in scorer.loglikelihood(pairs, desc)]
    acc, acc_norm, acc_bytes, pos = [], [], [], 0
    for item in items:
        ll = np.array(lls[pos:pos + len(item.choices)])
        pos += len(item.choices)
        chars = np.array([float(len(c)) for c in item.choices])
        nbytes = np.array([float(len(c.encode("utf-8"))) for c in item.choices])
        acc.append(float(np.argmax(ll) == item.gold))  # np.argmax: ties go to the first choice
        acc_norm.append(float(np.argmax(ll / chars) == item.gold))
        acc_bytes.append(float(np.argmax(ll / nbytes) == item.gold))
    return {"acc": float(np.mean(acc)), "acc_stderr": mean_stderr(acc),
            "acc_norm": float(np.mean(acc_norm)), "acc_norm_stderr": mean_stderr(acc_norm),
            "acc_bytes": float(np.mean(acc_bytes)), "n": len(items)}


def lambada(scorer: Scorer, items: Sequence[LambadaItem], desc: str = "lambada") -> dict[str, Any]:
    """`acc`: greedy decoding reproduces every target token; `ppl`: exp(-mean target log-likelihood)."""
    results = scorer.loglikelihood([(item.context, " " + item.target) for item in items], desc)
    lls = [ll for ll, _ in results]
    hits = [float(greedy) for _, greedy in results]
    return {"acc": float(np.mean(hits)), "acc_stderr": mean_stderr(hits),
            "ppl": math.exp(-float(np.mean(lls))), "n": len(items)}


def blimp(scorer: Scorer, paradigms: dict[str, Sequence[BlimpPair]], desc: str = "blimp") -> dict[str, Any]:
    """Per paradigm, the fraction of pairs with log P(good) >= log P(bad) (lm-eval's argmax, ties
    count as correct); `acc` is the unweighted mean over paradigms."""
    pairs = [("", " " + s) for items in paradigms.values() for p in items for s in (p.good, p.bad)]
    lls = [ll for ll, _ in scorer.loglikelihood(pairs, desc)]
    per_paradigm, pos = {}, 0
    for name, items in paradigms.items():
        good, bad = np.array(lls[pos:pos + 2 * len(items):2]), np.array(lls[pos + 1:pos + 2 * len(items):2])
        pos += 2 * len(items)
        per_paradigm[name] = float(np.mean(good >= bad))
    return {"acc": float(np.mean(list(per_paradigm.values()))), "paradigms": per_paradigm,
            "n": sum(len(items) for items in paradigms.values())}


def token_perplexity(scorer: Scorer, token_lists: Sequence[Sequence[int]], stride: int | None = None,
                     desc: str = "perplexity") -> dict[str, Any]:
    """Token-level perplexity of pre-tokenized streams (each scored from the prefix token)."""
    lls = scorer.rolling_loglikelihood(token_lists, stride, desc)
    tokens = sum(len(t) for t in token_lists)
    if tokens == 0:
        raise ValueError("no tokens to score")
    return {"ppl": math.exp(-sum(lls) / tokens), "nll": -sum(lls), "tokens": tokens, "n": len(token_lists)}


def perplexity(scorer: Scorer, texts: Sequence[str], stride: int | None = None, detokenize: bool = False,
               desc: str = "perplexity") -> dict[str, Any]:
    """Token perplexity plus lm-eval's `word_perplexity`, `byte_perplexity`, `bits_per_byte`
    (words and bytes are counted on the texts as given, before `detokenize`)."""
    scored = [wikitext_detokenize(t) if detokenize else t for t in texts]
    out = token_perplexity(scorer, [scorer.encode(t) for t in scored], stride, desc)
    total_ll = -out["nll"]
    words = sum(count_words(t) for t in texts)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"ppl": out["ppl"], "word_perplexity": math.exp(-total_ll / words),
            "byte_perplexity": math.exp(-total_ll / nbytes), "bits_per_byte": -total_ll / nbytes / math.log(2),
            "tokens": out["tokens"], "words": words, "bytes": nbytes, "n": len(texts)}
