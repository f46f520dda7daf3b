"""Every model the project writes, loaded for analysis and evaluation through one interface.

    loaded = load_any("runs/ft")        # a run, a checkpoint, a fine-tuning run, an upcycled HF folder
    loaded.model(inputs, targets)       # -> LMOutput (logits, losses, the MoE layers' outputs)

| PATH | what | model |
|---|---|---|
| run / checkpoint of `competesmoe train` (config.yaml a `RunConfig`) | `MoETransformer` | as trained |
| run / checkpoint of `competesmoe finetune` on a Hugging Face model (config.yaml a `FinetuneConfig`) | `HFCausalLM` | the upcycled model, the checkpoint's weights |
| an upcycled Hugging Face folder (`competesmoe upcycle` OUT, a fine-tuning run's RUN/hf) | `HFCausalLM` | `from_pretrained` |
| a `competesmoe export` folder | `MoETransformer` | `load_hf` |

A fine-tuning run's checkpoint holds the weights only: the architecture comes from RUN/hf/config.json
when the run has finished, otherwise from `model.init` (upcycled again as the run did it), and every
weight is the checkpoint's.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from torch import nn

from ..data import DataError
from ..moe import moe_layers

UPCYCLED = "competesmoe_upcycled"   # = model.upcycle.MODEL_TYPE, which imports transformers; this module must not


@dataclass
class Loaded:
    model: nn.Module            # forward(inputs [B, S], targets [B, S] | None) -> LMOutput, eval mode
    tokenizer: Any              # tokenizers.Tokenizer (encode_documents)
    hf_tokenizer: Any | None    # the transformers tokenizer of a Hugging Face model
    seq_len: int                # sequence length of the analysis token set (the run's, else the model's max, <= 512)
    max_length: int             # the model's context for zero-shot scoring
    eos_id: int
    cfg: Any                    # RunConfig, FinetuneConfig, or None for a folder
    kind: str                   # "run", "finetune", "hf", "export"
    path: Path

    @property
    def eval_model(self) -> nn.Module:
        """What zero-shot scoring calls as `model(input_ids) -> logits`."""
        return self.model.hf if self.kind in ("finetune", "hf") else self.model

    @property
    def eval_tokenizer(self) -> Any:
        return self.hf_tokenizer if self.hf_tokenizer is not None else self.tokenizer

    def moe_summary(self) -> dict[str, Any]:
        layers = moe_layers(self.model)
        if not layers:
            raise DataError(f"{self.path}: the model has no MoE layers")
        c = layers[0].cfg
        return {"router": c.router, "n_experts": c.n_routed, "top_k": c.k_routed, "n_layers": len(layers)}

    def valid_tokens(self) -> np.ndarray | None:
        """The run's validation split as a token stream (chat data: ~id for non-targets), or None."""
        if self.kind == "run":
            from ..data import prepare_data
            return prepare_data(self.cfg.data, log=lambda *_: None).valid
        if self.kind == "finetune":
            from ..data.chat import load_finetune_data
            return load_finetune_data(self.cfg.data, self.hf_tokenizer, self.cfg.chat).valid
        return None


def is_upcycled_folder(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    try:
        return cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == UPCYCLED
    except (OSError, ValueError):
        return False


def is_finetune_config(d: Any) -> bool:
    """A `FinetuneConfig` (competesmoe finetune on a Hugging Face model), not a `RunConfig`."""
    model = (d.get("model") or {}) if isinstance(d, dict) else {}
    return isinstance(d, dict) and ("chat" in d or {"experts", "top_k"} <= set(model))


def _hf_wrapped(hf: nn.Module, tok: Any, cfg: Any, kind: str, path: Path, device: Any) -> Loaded:
    from ..train.finetune import HFCausalLM
    model = HFCausalLM(hf).to(device).eval()
    max_pos = getattr(hf.config.get_text_config(), "max_position_embeddings", None) or 2048
    seq_len = cfg.data.seq_len if cfg is not None else min(max_pos, 512)
    eos = tok.eos_token_id
    if eos is None:
        raise DataError(f"{path}: the tokenizer has no EOS token (eos_token)")
    return Loaded(model, tok.backend_tokenizer, tok, seq_len, max_pos, int(eos), cfg, kind, path)


def _tokenizer(*folders: Any):
    from transformers import AutoTokenizer
    errors = []
    for folder in folders:
        try:
            return AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError, TypeError) as e:
            errors.append(f"{folder}: {e}")
    raise DataError("no tokenizer found (" + "; ".join(errors) + ")")


def load_upcycled_folder(path: str | Path, device: Any = "cpu") -> Loaded:
    from ..train.loading import auto_class
    from transformers import AutoConfig
    path = Path(path)
    config = AutoConfig.from_pretrained(str(path))
    hf = auto_class(config).from_pretrained(str(path))
    return _hf_wrapped(hf, _tokenizer(path), None, "hf", path, device)


def load_finetune_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], cfg_dict: dict,
                             device: Any = "cpu") -> Loaded:
    """A `competesmoe finetune` checkpoint of a Hugging Face model: rebuild the upcycled architecture,
    then load every weight from the checkpoint (missing or unexpected ones are an error)."""
    from transformers import AutoConfig
    from ..train.finetune import FinetuneConfig, HFCausalLM, as_configured
    from ..train.loading import auto_class
    from ..train.runs import load_weights
    cfg = FinetuneConfig.from_dict(cfg_dict)
    run = folder.parent.parent
    final = run / "hf"
    arch = final if (final / "config.json").is_file() else Path(cfg.model.init)
    try:
        config = AutoConfig.from_pretrained(str(arch))
    except OSError as e:
        raise DataError(f"{folder}: the fine-tuning run has no RUN/hf yet and its model.init ({arch}) cannot be "
                        f"read ({e}); the architecture is needed to load the checkpoint") from e
    hf = as_configured(auto_class(config).from_config(config), cfg, log=lambda *_: None)   # as the run built it
    model = HFCausalLM(hf)
    load_weights(model, tensors, folder)
    tok = _tokenizer(*([final] if (final / "config.json").is_file() else []), cfg.model.init)
    return _hf_wrapped(hf, tok, cfg, "finetune", folder, device)


def load_any(path: str | Path, device: Any = "cpu", log: Callable[[str], None] = print) -> Loaded:
    """Any model the project writes (table above), in eval mode on `device`."""
    from ..model.hf import is_hf_folder, load_hf
    path = Path(path)
    if is_upcycled_folder(path):
        return load_upcycled_folder(path, device)
    if is_hf_folder(path):
        hf, tok = load_hf(path, str(device))
        m = hf.model
        return Loaded(m.eval(), tok.backend_tokenizer, tok, m.cfg.max_seq_len, m.cfg.max_seq_len,
                      int(tok.eos_token_id), None, "export", path)
    from ..data.tokenizer import eos_id
    from ..train import checkpoint as ckpt
    from ..train.runs import load_trained
    folder = ckpt.resolve(path, log=log)
    cfg_yaml = (folder / "config.yaml").read_text()
    cfg_dict = yaml.safe_load(cfg_yaml)
    if is_finetune_config(cfg_dict):
        tensors, _, _ = ckpt.load(folder, map_location="cpu")
        return load_finetune_checkpoint(folder, tensors, cfg_dict, device)
    model, cfg, tok = load_trained(folder, device=device, log=log)
    return Loaded(model, tok, None, cfg.data.seq_len, cfg.model.max_seq_len, eos_id(tok), cfg, "run", folder)


__all__ = ["Loaded", "load_any", "is_upcycled_folder", "is_finetune_config"]
