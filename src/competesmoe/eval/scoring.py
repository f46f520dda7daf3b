"""Batched log-likelihood scoring, following lm-evaluation-harness's HFLM for causal models.

* `encode_pair`: trailing spaces of the context move to the continuation; the continuation's
  tokens are `encode(context + continuation)[len(encode(context)):]`; an empty context becomes
  the prefix (EOS/BOS) token.
* Inputs are `(context + continuation)[-(max_length + 1):][:-1]` (left truncation), sorted by
  length (longest first), right-padded, one forward per batch under `torch.no_grad`. A
  continuation longer than `max_length` (which lm-eval refuses) is scored in chunks.
* `rolling_windows`: disjoint windows for perplexity; `stride=max_length` is lm-eval's
  `loglikelihood_rolling`, a smaller stride gives every window `max_length - stride` tokens of
  extra context.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from .interface import TextTokenizer, as_tokenizer, logits_of, model_device

TokenPair = tuple[list[int], list[int]]  # (context_ids, continuation_ids)


def encode_pair(tokenizer: TextTokenizer, context: str, continuation: str, prefix_token_id: int) -> TokenPair:
    """Token ids of a (context, continuation) request, as lm-eval encodes them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces and context.strip():
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    elif not context.strip():
        context, continuation = "", context + continuation
    if context == "":
        cont = list(tokenizer.encode(continuation))
        ctx, cont = ([prefix_token_id], cont) if cont and cont[0] != prefix_token_id else (cont[:1], cont[1:])
    else:
        ctx = list(tokenizer.encode(context))
        cont = list(tokenizer.encode(context + continuation))[len(ctx):]
    if not cont:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens after context {context[-40:]!r}")
    return ctx, cont


def rolling_windows(tokens: Sequence[int], prefix_token_id: int, max_length: int,
                    stride: int | None = None) -> list[TokenPair]:
    """(context, continuation) windows whose continuations tile `tokens` exactly once.

    The first window predicts the first `max_length` tokens after the prefix token; each later
    window predicts the next `stride` tokens (default `max_length`) with inputs filling
    `max_length` positions, i.e. `max_length - stride` extra tokens of context.
    """
    stride = max_length if stride is None else stride
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride={stride} must be in [1, max_length={max_length}]")
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    windows = [([prefix_token_id], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, stride)
        end = done + n
        inputs = tokens[max(end - max_length - 1, 0):end - 1]
        windows.append((inputs[:len(inputs) - (n - 1)], tokens[done:end]))
        done = end
    return windows


def _chunks(context: Sequence[int], continuation: Sequence[int], max_length: int) -> list[TokenPair]:
    """A request split so that no continuation exceeds `max_length` (lm-eval would refuse it):
    chunk j scores `continuation[j:j+max_length]` after everything before it."""
    ctx, cont = list(context), list(continuation)
    return [(ctx + cont[:j], cont[j:j + max_length]) for j in range(0, len(cont), max_length)]


@torch.no_grad()
def loglikelihood_tokens(model: Any, requests: Sequence[TokenPair], max_length: int, *, batch_size: int = 8,
                         pad_token_id: int = 0, device: str | torch.device | None = None,
                         progress: bool = False, desc: str = "loglikelihood") -> list[tuple[float, bool]]:
    """(sum log P(continuation | context), greedy decoding reproduces the continuation) per request."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    dev = model_device(model, device)
    pieces: list[TokenPair] = []
    owner: list[int] = []
    for i, (ctx, cont) in enumerate(requests):
        if not ctx or not cont:
            raise ValueError("context and continuation must both be non-empty token lists")
        chunks = _chunks(ctx, cont, max_length)
        pieces += chunks
        owner += [i] * len(chunks)
    inputs = [(ctx + cont)[-(max_length + 1):][:-1] for ctx, cont in pieces]
    order = sorted(range(len(pieces)), key=lambda i: -len(inputs[i]))
    results = [(0.0, True)] * len(requests)
    bar = tqdm(total=len(pieces), desc=desc, disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = max(len(inputs[i]) for i in batch)
        ids_BS = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        for row, i in enumerate(batch):
            ids_BS[row, :len(inputs[i])] = torch.tensor(inputs[i], dtype=torch.long)
        logits_BSV = logits_of(model(ids_BS.to(dev)))
        # every continuation position of the batch at once: one log_softmax, one transfer
        rows, cols, targets = [], [], []
        for row, i in enumerate(batch):
            cont, end = pieces[i][1], len(inputs[i])
            rows += [row] * len(cont)
            cols += range(end - len(cont), end)
            targets += cont
        index = {"device": logits_BSV.device, "dtype": torch.long}
        logits_NV = logits_BSV[torch.tensor(rows, **index), torch.tensor(cols, **index)]
        if logits_NV.dtype in (torch.float16, torch.bfloat16):
            logits_NV = logits_NV.float()
        logp_NV = logits_NV.log_softmax(-1)
        target_N = torch.tensor(targets, **index)
        token_ll = logp_NV.gather(-1, target_N[:, None])[:, 0].tolist()
        token_hit = (logp_NV.argmax(-1) == target_N).tolist()
        pos = 0
        for i in batch:  # summed in Python (float64), in token order: deterministic
            n = len(pieces[i][1])
            prev_ll, prev_greedy = results[owner[i]]
            results[owner[i]] = (prev_ll + sum(token_ll[pos:pos + n]), prev_greedy and all(token_hit[pos:pos + n]))
            pos += n
        bar.update(len(batch))
    bar.close()
    return results


class Scorer:
    """A model + tokenizer + settings, answering text-level log-likelihood requests."""

    def __init__(self, model: Any, tokenizer: Any, *, max_length: int | None = None,
                 prefix_token_id: int | None = None, batch_size: int = 8,
                 device: str | torch.device | None = None, progress: bool = True) -> None:
        self.model = model
        self.tokenizer = as_tokenizer(tokenizer)
        self.max_length = int(max_length or getattr(model, "max_length", 0) or 0)
        if self.max_length < 1:
            raise ValueError("model has no max_length attribute; pass max_length=")
        prefix = prefix_token_id
        for source in (model, self.tokenizer):
            if prefix is None:
                prefix = getattr(source, "eos_token_id", None)
        if prefix is None:
            raise ValueError("neither the model nor the tokenizer has eos_token_id; pass prefix_token_id=")
        self.prefix_token_id = int(prefix)
        self.batch_size = batch_size
        self.device = model_device(model, device)
        self.progress = progress

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def loglikelihood_tokens(self, requests: Sequence[TokenPair], desc: str = "loglikelihood") -> list[tuple[float, bool]]:
        return loglikelihood_tokens(self.model, requests, self.max_length, batch_size=self.batch_size,
                                    pad_token_id=self.prefix_token_id, device=self.device,
                                    progress=self.progress, desc=desc)

    def loglikelihood(self, pairs: Iterable[tuple[str, str]], desc: str = "loglikelihood") -> list[tuple[float, bool]]:
        """Per (context, continuation) text pair: (log-likelihood, is_greedy)."""
        requests = [encode_pair(self.tokenizer, c, x, self.prefix_token_id) for c, x in pairs]
        return self.loglikelihood_tokens(requests, desc)

    def rolling_loglikelihood(self, token_lists: Sequence[Sequence[int]], stride: int | None = None,
                              desc: str = "perplexity") -> list[float]:
        """Total log-likelihood of each token list, every token predicted once (first one from the prefix token)."""
        windows, owner = [], []
        for doc, tokens in enumerate(token_lists):
            w = rolling_windows(tokens, self.prefix_token_id, self.max_length, stride)
            windows += w
            owner += [doc] * len(w)
        totals = [0.0] * len(token_lists)
        for doc, (ll, _) in zip(owner, self.loglikelihood_tokens(windows, desc)):
            totals[doc] += ll
        return totals
