"""`analyze_checkpoints`: the routing metrics of Section 5.2.2 and Appendices F–G (expert change rate,
router–competition agreement, entropies, top-(K+1) shift) of a run's checkpoints on one fixed token set.

    paths = checkpoint_paths("runs/tiny")            # oldest first
    seqs = run_token_set(paths[-1], max_tokens=4096)  # first tokens of the run's validation split
    report = analyze_checkpoints(paths, seqs)

ECR compares consecutive checkpoints; agreement (router vs competition in analysis mode) is measured
at every checkpoint; entropies, the load matrix and the top-(K+1) shift use the last checkpoint.
Any model the project writes can be analysed (`eval.loading.load_any`): pre-training runs, fine-tuning
runs of Hugging Face models (their checkpoints), upcycled Hugging Face folders (one "checkpoint", no
ECR; pass a text for the token set: a folder has no validation split) and `competesmoe export` folders.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..config import ConfigError
from ..data import DataError, packed
from ..eval.loading import Loaded, is_upcycled_folder, load_any
from ..train import lm_loss
from ..train.checkpoint import CheckpointError, checkpoints, step_of
from . import metrics
from .collect import Routings, collect
from .shift import top_k_shift


def checkpoint_paths(items: Sequence[str | Path]) -> list[Path]:
    """Checkpoint folders, oldest first, from run folders, `checkpoints/` folders, checkpoints or model
    folders (an upcycled Hugging Face folder or a `competesmoe export`: one model, step -1)."""
    from ..model.hf import is_hf_folder
    found: list[Path] = []
    for item in items:
        p = Path(item)
        if not p.exists():
            raise CheckpointError(f"{p}: no such run or checkpoint folder")
        if (p / "manifest.json").is_file() or is_upcycled_folder(p) or is_hf_folder(p):
            found.append(p)
            continue
        listed = checkpoints(p / "checkpoints") or checkpoints(p)
        if not listed:
            raise CheckpointError(f"{p}: holds no checkpoint (expected RUN/checkpoints/step_*) and is no model folder "
                              f"(config.json of an upcycled or exported model)")
        found.extend(listed)
    return sorted(dict.fromkeys(found), key=_step)


def _step(path: Path) -> int:
    """The checkpoint's step, -1 for a folder not named step_<digits> (sorted first)."""
    step = step_of(path)
    return -1 if step is None else step


def run_token_set(ckpt: str | Path | Loaded, max_tokens: int = 4096, text: str | None = None,
                  log: Callable[[str], None] = print, seq_len: int | None = None) -> torch.Tensor:
    """Fixed analysis sequences [B, seq_len + 1]: the first `max_tokens` tokens of `text` (a file or
    folder read like training data, encoded with the model's tokenizer) or of the run's validation split.
    `seq_len` defaults to the run's (a model folder: its context, at most 512)."""
    if max_tokens < 1:
        raise ConfigError(f"the token set needs at least one token (--tokens), got {max_tokens}")
    loaded = ckpt if isinstance(ckpt, Loaded) else load_any(ckpt, log=log)
    seq_len = seq_len or loaded.seq_len
    if text is not None:
        from ..data import encode_documents, read_documents
        tokens = encode_documents(loaded.tokenizer, read_documents(text), loaded.eos_id)
    else:
        valid = loaded.valid_tokens()
        if valid is None or len(valid) == 0:
            raise DataError(f"{loaded.path}: no validation split (a model folder has none, or the run had none); "
                            f"pass a text file (--data)")
        tokens = valid[: max_tokens + seq_len + 1]
    return packed(tokens, seq_len, max_tokens)


def _agreement(r: Routings) -> dict[str, Any]:
    per_layer = [metrics.agreement(layer.cat("indices"), layer.cat("winners")) for layer in r.layers]
    return {"per_layer": per_layer,
            "agreement": sum(a["agreement"] for a in per_layer) / len(per_layer),
            "top1_agreement": sum(a["top1_agreement"] for a in per_layer) / len(per_layer)}


def analyze_checkpoints(paths: Sequence[str | Path], seqs_BS1: torch.Tensor, batch_size: int = 16,
                        shift: bool = True, eval_tasks: str | None = None, eval_data: str | None = None,
                        eval_limit: int | None = None, device: str = "cpu",
                        log: Callable[[str], None] = print) -> dict[str, Any]:
    """The analysis report (a JSON-ready dict) of `paths` (oldest first) on `seqs_BS1`."""
    if not paths:
        raise CheckpointError("no checkpoint to analyse")
    steps, agree, ecr = [], [], []
    prev: list[torch.Tensor] | None = None
    for path in paths:
        loaded = load_any(path, device=device, log=log)
        model = loaded.model
        r = collect(model, seqs_BS1, batch_size, winners=True, device=device)
        step = _step(Path(path))
        steps.append(step)
        agree.append({"step": step, "ppl": r.ppl, **_agreement(r)})
        idx = r.indices()
        if prev is not None:
            ecr.append({"from_step": steps[-2], "to_step": step, **metrics.expert_change_rate(prev, idx)})
        prev = idx
        log(f"step {step}: ppl {r.ppl:.2f}, agreement {agree[-1]['agreement']:.3f}"
            + (f", ECR {ecr[-1]['ecr']:.3f}" if ecr else ""))
    m = loaded.moe_summary()
    N = m["n_experts"]
    final = {"step": steps[-1], "ppl": r.ppl, "loss": r.loss,
             "entropy": [metrics.layer_entropies(l.cat("indices"), l.cat("weights"), l.cat("logits")) for l in r.layers],
             "load": metrics.expert_load(idx, N).tolist()}
    if shift:
        final["shift"] = shift_effect(model, seqs_BS1, loaded, None, batch_size, eval_tasks, eval_data,
                                      eval_limit, device, base_loss=r.loss)
    return {"checkpoints": [str(p) for p in paths], "steps": steps, "tokens": r.tokens,
            "router": m["router"], "n_layers": len(r.layers), "n_experts": N, "top_k": m["top_k"],
            "ecr": ecr, "agreement": agree, "final": final}


def shift_effect(model, seqs_BS1: torch.Tensor, tokenizer, cfg, batch_size: int = 16,
                 eval_tasks: str | None = None, eval_data: str | None = None, eval_limit: int | None = None,
                 device: str = "cpu", base_loss: float | None = None) -> dict[str, Any]:
    """Perplexity (and optional zero-shot results) with normal vs top-(K+1)-shifted routing.

    `tokenizer` may be a `Loaded` (any model the project writes); then `cfg` is not needed."""
    import math
    model.eval()
    if base_loss is None:
        base_loss = lm_loss(model, seqs_BS1.split(batch_size), device).loss
    with top_k_shift(model):
        shifted = lm_loss(model, seqs_BS1.split(batch_size), device)
    out: dict[str, Any] = {"ppl": math.exp(min(base_loss, 50)), "shifted_ppl": shifted.ppl}
    out["delta_ppl"] = out["shifted_ppl"] - out["ppl"]
    if eval_tasks:
        from ..eval import evaluate
        if isinstance(tokenizer, Loaded):
            scored, tok, max_length = tokenizer.eval_model, tokenizer.eval_tokenizer, tokenizer.max_length
            extra = {"prefix_token_id": tokenizer.eos_id}
        else:
            scored, tok, max_length, extra = model, tokenizer, cfg.model.max_seq_len, {}
        kw = dict(limit=eval_limit, batch_size=batch_size, device=device, max_length=max_length, progress=False, **extra)
        base = evaluate(scored, tok, eval_tasks, eval_data, name="top-K", **kw)
        with top_k_shift(model):
            shifted = evaluate(scored, tok, eval_tasks, eval_data, name="top-(K+1) shift", **kw)
        out["zero_shot"] = {"base": base, "shifted": shifted}
    return out
