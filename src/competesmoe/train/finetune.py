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
from torch import nn

from ..config import Config, ScheduleConfig, apply_overrides, check
from ..data import DataConfig
from ..data.chat import unmask
from ..moe import moe_layers
from ..model.loss import lm_cross_entropy
from ..model.transformer import LMOutput
from ..model.upcycle import MODEL_TYPE, UpcycleConfig, UpcycleError, decoder_layers, is_upcycled, upcycle, upcycle_transformer
from . import distributed
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

    def validate(self) -> None:
        E = self.train.expert_parallel
        check(self.model.experts % E == 0, f"train.expert_parallel={E} must divide the {self.model.experts} experts "
                                           f"of each layer")


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
        if targets is not None:  # mean over the target tokens, without float32 copies of the [B·S, V] logits
            if bool((targets != -100).any()):
                lm = lm_cross_entropy(out.logits.view(-1, out.logits.shape[-1]), targets.reshape(-1))
            else:   # a chat window without any reply token: 0, not NaN (the mean over no token)
                lm = out.logits.sum().float() * 0.0
            loss = lm + aux
        return LMOutput(out.logits, loss, lm, aux, moe)

    def layer_units(self) -> list[nn.Module]:
        """The repeated layers (FSDP2 units, activation checkpointing): the decoder layers, and the layers of a
        vision encoder where the model has one (LLaVA-style VLMs)."""
        units = list(decoder_layers(self.hf))
        for name, module in self.hf.named_modules():
            if name.rsplit(".", 1)[-1] in ("vision_tower", "vision_model", "visual"):
                lists = [m for m in module.modules() if isinstance(m, nn.ModuleList) and len(m) > 1
                         and len({type(l) for l in m}) == 1]
                units += list(max(lists, key=len)) if lists else []
                break
        return units

    def num_parameters(self, active: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        if active:
            for layer in moe_layers(self):
                per_expert = sum(p[0].numel() for p in layer.experts.parameters())
                total -= per_expert * (layer.cfg.n_routed - layer.cfg.k_routed)
        return total


def _drop_tied(module: nn.Module, state: dict, prefix: str, local_metadata: Any) -> None:
    """Tied parameters by identity (not by storage: FSDP2's DTensors do not expose one)."""
    from .runs import tied_names
    for name in tied_names(module):
        state.pop(prefix + name, None)


# --- building the run ---------------------------------------------------------------------------------
def init_spec(init: str) -> dict | None:
    """The upcycling settings an already upcycled `init` was made with (None for a dense model)."""
    path = Path(init) / "config.json"
    if path.is_file():
        try:
            cfg = json.loads(path.read_text())
        except ValueError as e:
            raise UpcycleError(f"{path}: not a model's config.json ({e})") from None
        if isinstance(cfg, dict) and cfg.get("model_type") == MODEL_TYPE:
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
    return dataclasses.replace(m, competition=spec.competition, losses=spec.losses, backend=spec.backend)


def _use_settings(model: nn.Module, spec: UpcycleConfig) -> None:
    """An already upcycled model keeps its experts and routers; its competition, losses and expert dispatch
    (`model.backend`) follow `spec`."""
    for layer in moe_layers(model):
        layer.cfg = _with_settings(layer.cfg, spec)
        layer.experts.backend = spec.backend


def build(cfg: FinetuneConfig, log: Callable[[str], None] = print, writes: bool = True):
    """(config to record, model for the Trainer, data or None, writer of the final HF folder from a full state
    dict). `writes`: this process writes the run folder's files (rank 0 under torchrun)."""
    init, spec = cfg.model.init, cfg.spec
    check(init != "", "finetune needs a model to start from (model.init: a folder, run or hub name)")
    check(cfg.data.train != "synthetic", "finetune needs data (data.train: a text or chat file/folder)")
    have = init_spec(init)
    if have is not None:
        _check_structure(spec, have, init)
    if is_competesmoe_source(init):
        from ..model.hf import hf_tokenizer, save_hf
        from ..model.transformer import MoETransformer
        from ..files import atomic_write
        from .runs import load_weights
        if cfg.chat:
            raise UpcycleError("chat data with a competesmoe model is not supported (its tokenizer has no chat "
                               "template); fine-tune it on text")
        model, tok = load_competesmoe(init, log=log)
        if model.cfg.dense:
            model = upcycle_transformer(model, spec)
            log(f"upcycled {init}: {spec.experts} experts, K {spec.top_k}, router {spec.router}")
        else:
            model.cfg = dataclasses.replace(model.cfg, moe=_with_settings(model.cfg.moe, spec))
            _use_settings(model, spec)
        tok = hf_tokenizer(tok)
        tok_path = Path(cfg.train.out_dir) / "init-tokenizer.json"
        if writes:
            atomic_write(tok_path, tok.backend_tokenizer.to_str())
        run = RunConfig(model=model.cfg, data=dataclasses.replace(cfg.data, tokenizer=str(tok_path)), train=cfg.train)

        def write_transformer(state: dict, folder: Path) -> None:
            full = MoETransformer(run.model)
            load_weights(full, state, "the trained model")
            save_hf(full, tok, folder)
        return run, model, None, write_transformer
    from transformers import AutoTokenizer
    from ..data.chat import load_finetune_data
    hf = load_dense_hf(init)
    if not is_upcycled(hf):
        hf = upcycle(hf, spec)
        log(f"upcycled {init}: {spec.experts} experts, K {spec.top_k}, router {spec.router}, layers {spec.layers}")
    else:
        _use_settings(hf, spec)
        saved = hf.config.competesmoe["upcycle"].get("targets", "language")   # the structure it was built with
        hf.config.competesmoe["upcycle"] = {**spec.to_dict(), "targets": saved}   # saved with the final model
    tok = AutoTokenizer.from_pretrained(init)
    data = load_finetune_data(cfg.data, tok, cfg.chat)
    max_pos = getattr(hf.config.get_text_config(), "max_position_embeddings", None)
    check(max_pos is None or cfg.data.seq_len <= max_pos,
          f"data.seq_len={cfg.data.seq_len} exceeds the model's max_position_embeddings={max_pos}")

    def write_hf(state: dict, folder: Path) -> None:   # the full weights, whatever the run's layout
        hf.save_pretrained(str(folder), state_dict={k[len("hf."):]: v for k, v in state.items()})
        tok.save_pretrained(str(folder))
    return cfg, HFCausalLM(hf), data, write_hf


def finetune(cfg: FinetuneConfig, resume: bool = False, log: Callable[[str], None] = print) -> dict:
    """Train `cfg` to the end (or continue it with `resume`); returns the summary, and writes RUN/hf.

    Under torchrun every rank trains and takes part in gathering the final weights; rank 0 alone writes
    finetune.yaml, hf/ and summary.json (each atomically: a failed run leaves no half-written file)."""
    from ..files import atomic_folder, atomic_write
    from .loop import Trainer, check_run_folder
    from .runs import dump_summary, resolve_device
    d = distributed.setup(cfg.train, resolve_device(cfg.train.device))   # the process group first: who writes
    check_run_folder(Path(cfg.train.out_dir), resume)
    record, model, data, write = build(cfg, d.logger(log), writes=d.is_main)
    trainer = Trainer(record, resume=resume, log=log, model=model, data=data)
    if trainer.dist.is_main:
        atomic_write(trainer.out / "finetune.yaml", cfg.to_yaml())
    summary = trainer.train()
    summary["hf"] = str(trainer.out / "hf")
    state = trainer.dist.full_state_dict(trainer.model)   # every rank: FSDP2 shards and expert slices gathered
    if trainer.dist.is_main:
        atomic_folder(trainer.out / "hf", lambda folder: write(state, folder))
        dump_summary(summary, trainer.out)
    trainer.dist.barrier()
    return summary
