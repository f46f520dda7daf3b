"""Fine-tuning an upcycled model with any router, on the pre-training `Trainer` (docs/upcycle.md).

    cfg = finetune_preset("vit", {"model.init": "my-llama", "data.train": "chat.jsonl", "chat": True})
    summary = finetune(cfg)

`model.init` is a dense model (upcycled first with the `model` settings) or an already upcycled one:
* our `MoETransformer` (`competesmoe export` folder, or a run/checkpoint of `--set model.dense=true`):
  an ordinary training run (its config.yaml is a `RunConfig`), so `eval`, `analyze` and `export` read it;
* a Hugging Face model: `HFCausalLM` gives it the `MoETransformer` interface, the data is tokenised with
  its own tokenizer (`data.chat`), and config.yaml holds this `FinetuneConfig`.
Either way the `Trainer` gives the same guarantees (progress bar, metrics, bf16, atomic checkpoints, exact
resume) and the competition schedule advances once per optimizer step; the final model is written to
RUN/hf as a Hugging Face folder.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, ScheduleConfig, apply_overrides, check
from ..data import DataConfig
from ..data.chat import unmask
from ..moe import moe_layers
from ..model.transformer import LMOutput
from ..model.upcycle import UpcycleConfig, UpcycleError, is_upcycled, upcycle, upcycle_transformer
from .config import RunConfig, TrainConfig
from .loading import is_competesmoe_source, load_competesmoe, load_dense_hf

STRUCTURE = ("experts", "top_k", "router", "layers", "router_opts")  # what an upcycled model has fixed


@dataclass
class FinetuneModel(UpcycleConfig):
    init: str = ""                  # dense or upcycled model: HF folder / hub name, competesmoe export, run, checkpoint


@dataclass
class FinetuneConfig(Config):
    model: FinetuneModel = field(default_factory=FinetuneModel)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    chat: bool = False              # data.train/valid are chat jsonl ({"messages": [...]}); loss on replies only

    @property
    def tokens_per_step(self) -> int:
        return self.train.batch_size * self.train.grad_accum * self.data.seq_len

    @property
    def spec(self) -> UpcycleConfig:
        return UpcycleConfig.from_dict({k: v for k, v in self.model.to_dict().items() if k != "init"})


# Appendix I.1, Table 10 (VIT stage): lr 4e-6 cosine, 5 sequences per GPU x 4 GPUs, 2,048 tokens, AdamW;
# 4 experts, K 2 (Table 11); switch 0.01 + z-loss 0.001 (UpcycleConfig's defaults); ω 0.07, A_max 9,
# SMoE warm-up 5% (Section 2.4).
FINETUNE_PRESETS: dict[str, FinetuneConfig] = {
    "vit": FinetuneConfig(
        model=FinetuneModel(experts=4, top_k=2, router="competesmoe"),
        data=DataConfig(seq_len=2048),
        train=TrainConfig(out_dir="runs/finetune", steps=1000, batch_size=5, grad_accum=4, lr=4e-6, min_lr_ratio=0.0, warmup_steps=30,
                          weight_decay=0.0, precision="bf16", eval_every=200, ckpt_every=200,
                          schedule=ScheduleConfig(omega=0.07, a_max=9, warmup=0.05, seed=42))),
}


def finetune_preset(name: str, overrides: list[str] | dict | None = None) -> FinetuneConfig:
    check(name in FINETUNE_PRESETS, f"unknown finetune preset {name!r}; choose from {sorted(FINETUNE_PRESETS)}")
    return apply_overrides(FINETUNE_PRESETS[name], overrides or {})


# --- a Hugging Face model behind the MoETransformer interface ----------------------------------------
class HFCausalLM(nn.Module):
    """`forward(input_ids, targets) -> LMOutput` for an upcycled transformers causal LM (weights under `hf.`).

    Takes the trainer's `batch[:, :-1], batch[:, 1:]` with chat masks encoded as ~id (`data.chat.unmask`).
    Its state dict names each tensor once (tied embeddings under the first name), as checkpoints store it."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf, self.cfg = hf, hf.config
        self.register_state_dict_post_hook(_drop_tied)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, compete: bool | None = None,
                **_: Any) -> LMOutput:
        if compete is not None:
            raise ValueError("compete= is not supported for Hugging Face models: the attached schedule decides")
        if targets is not None:
            input_ids, targets = unmask(input_ids, targets)
        out = self.hf(input_ids=input_ids, use_cache=False)
        aux, moe = out.aux_loss, list(self.hf.moe_outputs)
        lm = loss = None
        if targets is not None:  # mean over the target tokens; 0 (not NaN) for a window without any
            flat = out.logits.float().view(-1, out.logits.shape[-1])
            total = F.cross_entropy(flat, targets.reshape(-1), ignore_index=-100, reduction="sum")
            lm = total / (targets != -100).sum().clamp_min(1)
            loss = lm + aux
        return LMOutput(out.logits, loss, lm, aux, moe)

    def num_parameters(self, active: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        if active:
            for layer in moe_layers(self):
                per_expert = sum(p[0].numel() for p in layer.experts.parameters())
                total -= per_expert * (layer.cfg.n_routed - layer.cfg.k_routed)
        return total


def _drop_tied(module: nn.Module, state: dict, prefix: str, local_metadata: Any) -> None:
    seen = set()
    for key in list(state):
        t = state[key]
        ident = (t.data_ptr(), t.shape, t.stride()) if t.numel() else None
        if ident is not None and ident in seen:
            del state[key]
        seen.add(ident)


# --- building the run ---------------------------------------------------------------------------------
def init_spec(init: str) -> dict | None:
    """The upcycling settings an already upcycled `init` was made with (None for a dense model)."""
    path = Path(init) / "config.json"
    if path.is_file():
        cfg = json.loads(path.read_text())
        if cfg.get("model_type") == "competesmoe_upcycled":
            return cfg["competesmoe"]["upcycle"]
    if is_competesmoe_source(init):
        model, _ = load_competesmoe(init, log=lambda *_: None)
        m = model.cfg.moe
        if not model.cfg.dense:
            return {"experts": m.n_experts, "top_k": m.top_k, "router": m.router, "layers": "all",
                    "router_opts": m.router_opts.to_dict(), "competition": m.competition.to_dict(),
                    "losses": m.losses.to_dict()}
    return None


def _check_structure(spec: UpcycleConfig, have: dict, init: str) -> None:
    asked = spec.to_dict()
    diffs = [f"{k} {have[k]!r} (asked {asked[k]!r})" for k in STRUCTURE if have.get(k) != asked[k]]
    if diffs:
        raise UpcycleError(f"{init} is already upcycled with " + ", ".join(diffs) + "; fine-tune it with its own "
                           f"settings, or upcycle the dense model with the new ones")


def _with_settings(m, spec: UpcycleConfig):
    return dataclasses.replace(m, competition=spec.competition, losses=spec.losses)


def _use_settings(model: nn.Module, spec: UpcycleConfig) -> None:
    """An already upcycled model keeps its experts and routers; its competition and losses follow `spec`."""
    for layer in moe_layers(model):
        layer.cfg = _with_settings(layer.cfg, spec)


def build(cfg: FinetuneConfig, log: Callable[[str], None] = print):
    """(config to record, model for the Trainer, data or None, writer of the final HF folder)."""
    init, spec = cfg.model.init, cfg.spec
    check(init != "", "finetune needs a model to start from (model.init: a folder, run or hub name)")
    check(cfg.data.train != "synthetic", "finetune needs data (data.train: a text or chat file/folder)")
    have = init_spec(init)
    if have is not None:
        _check_structure(spec, have, init)
    if is_competesmoe_source(init):
        from ..model.hf import hf_tokenizer, save_hf
        model, tok = load_competesmoe(init, log=log)
        if model.cfg.dense:
            model = upcycle_transformer(model, spec)
            log(f"upcycled {init}: {spec.experts} experts, K {spec.top_k}, router {spec.router}")
        else:
            model.cfg = dataclasses.replace(model.cfg, moe=_with_settings(model.cfg.moe, spec))
            _use_settings(model, spec)
        out = Path(cfg.train.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tok = hf_tokenizer(tok)
        tok_path = out / "init-tokenizer.json"
        tok.backend_tokenizer.save(str(tok_path))
        run = RunConfig(model=model.cfg, data=dataclasses.replace(cfg.data, tokenizer=str(tok_path)), train=cfg.train)
        if cfg.chat:
            raise UpcycleError("chat data with a competesmoe model is not supported (its tokenizer has no chat "
                               "template); fine-tune it on text")
        return run, model, None, lambda m, folder: save_hf(m, tok, folder)
    from transformers import AutoTokenizer
    from ..data.chat import load_finetune_data
    hf = load_dense_hf(init)
    if not is_upcycled(hf):
        hf = upcycle(hf, spec)
        log(f"upcycled {init}: {spec.experts} experts, K {spec.top_k}, router {spec.router}, layers {spec.layers}")
    else:
        _use_settings(hf, spec)
        hf.config.competesmoe["upcycle"] = spec.to_dict()   # saved with the final model
    tok = AutoTokenizer.from_pretrained(init)
    data = load_finetune_data(cfg.data, tok, cfg.chat)
    max_pos = getattr(hf.config.get_text_config(), "max_position_embeddings", None)
    check(max_pos is None or cfg.data.seq_len <= max_pos,
          f"data.seq_len={cfg.data.seq_len} exceeds the model's max_position_embeddings={max_pos}")

    def write(model: HFCausalLM, folder: Path) -> None:
        model.hf.save_pretrained(str(folder))
        tok.save_pretrained(str(folder))
    return cfg, HFCausalLM(hf), data, write


def finetune(cfg: FinetuneConfig, resume: bool = False, log: Callable[[str], None] = print) -> dict:
    """Train `cfg` to the end (or continue it with `resume`); returns the summary, and writes RUN/hf."""
    from .loop import Trainer
    from .runs import dump_summary
    record, model, data, write = build(cfg, log)
    trainer = Trainer(record, resume=resume, log=log, model=model, data=data)
    (trainer.out / "finetune.yaml").write_text(cfg.to_yaml())
    summary = trainer.train()
    write(trainer.model, trainer.out / "hf")
    summary["hf"] = str(trainer.out / "hf")
    dump_summary(summary, trainer.out)
    return summary
