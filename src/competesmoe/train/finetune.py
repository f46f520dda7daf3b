"""Fine-tuning a model with any router, on the pre-training `Trainer` (docs/upcycle.md, docs/vlm.md).

    cfg = finetune_preset("vit", {"model.init": "my-llama", "data.train": "chat.jsonl", "chat": True})
    summary = finetune(cfg)
    cfg = finetune_preset("vlm-vit", {"model.init": "runs/pft/hf", "data.train": "llava.json", "images": "imgs/"})

`model.init` is a dense model (upcycled first with the `model` settings, unless `model.upcycle=false`) or
an already upcycled one:
* our `MoETransformer` (`competesmoe export` folder, or a run/checkpoint of `--set model.dense=true`):
  an ordinary training run (its config.yaml is a `RunConfig`), so `eval`, `analyze` and `export` read it;
* a Hugging Face model, a causal LM or a LLaVA-style VLM: `HFCausalLM` gives it the `MoETransformer`
  interface; text (`data.chat`) is tokenised with its own tokenizer, LLaVA-format samples with images
  (`llava=true`, `data.llava`) with its own processor; config.yaml holds this `FinetuneConfig`.
Either way the `Trainer` gives the same guarantees (progress bar, metrics, bf16, atomic checkpoints, exact
resume, torchrun with DDP, FSDP2 per layer and expert parallelism) and the competition schedule advances
once per optimizer step; module groups outside `trainable` are frozen (not in the optimizer); the final
model is written to RUN/hf as a Hugging Face folder.

The paper's three vision-language stages (Appendix I.1, Table 10) are presets here:

| preset | trained | MoE | lr (cosine) | batch (per GPU x 4 GPUs) | balance / z-loss |
|---|---|---|---|---|---|
| `vlm-pt` | connector | no | 1e-3 | 64 x 4 | - |
| `vlm-pft` | vision, connector, language | no | 2e-6 | 6 x 4 | - |
| `vlm-vit` | vision, connector, language | vision encoder + connector, 4 experts, top-2 | 4e-6 | 5 x 4 | 0.01 / 0.001 |

All three: one epoch, AdamW without weight decay, 2,048 tokens per sample at most, bf16, warm-up 3% of
the steps (LLaVA-1.5's `warmup_ratio`), cosine to 0, gradient clipping at 1.0 (LLaVA's, transformers'
default); VIT: ω 0.07, A_max 9, SMoE warm-up 5% (Section 2.4), router N(0, 0.02) seed 42. The 4 GPUs
are 4 gradient-accumulation steps on one process (`train.grad_accum`), so an optimizer step sees the
paper's global batch; under torchrun set `train.batch_size` to the global micro-batch.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..config import Config, ScheduleConfig, apply_overrides, check
from ..data import DataConfig, DataError
from ..data.chat import unmask
from ..moe import moe_layers
from ..model.loss import lm_cross_entropy
from ..model.transformer import LMOutput
from ..model.upcycle import (MODEL_TYPE, TARGETS, UpcycleConfig, UpcycleError, decoder_layers, freeze, is_upcycled, upcycle,
                              upcycle_transformer)
from . import distributed
from .config import RunConfig, TrainConfig
from .loading import is_competesmoe_source, load_competesmoe, load_dense_hf

STRUCTURE = ("experts", "top_k", "router", "layers", "router_opts")  # what an upcycled model has fixed


@dataclass
class FinetuneModel(UpcycleConfig):
    init: str = ""                  # dense or upcycled model: HF folder / hub name, competesmoe export, run, checkpoint
    upcycle: bool = True            # false: a dense init is trained dense (the VLM PT/PFT stages, a dense baseline)


@dataclass
class FinetuneConfig(Config):
    model: FinetuneModel = field(default_factory=FinetuneModel)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    chat: bool = False              # data.train/valid are chat jsonl ({"messages": [...]}); loss on replies only
    llava: bool = False             # data.train/valid are LLaVA-format samples (data/llava.py); the model is a VLM
    images: str | None = None       # llava: the folder the samples' "image" paths are relative to
    aspect: str = "pad"             # llava: "pad" to a square (LLaVA-1.5's image_aspect_ratio) or "resize"
    skip_bad: bool = False          # llava: skip (and count) bad samples instead of stopping with an error
    trainable: str = "all"          # "all", or the module groups that train (vision, connector, language)
    epochs: float = 0.0             # > 0: train.steps = ceil(epochs x training samples / (batch_size x grad_accum))
    warmup_ratio: float | None = None   # set: train.warmup_steps = ceil(warmup_ratio x train.steps)

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step (for LLaVA data an upper bound: samples are padded, not packed)."""
        return self.train.batch_size * self.train.grad_accum * self.data.seq_len

    @property
    def spec(self) -> UpcycleConfig:
        return UpcycleConfig.from_dict({k: v for k, v in self.model.to_dict().items() if k not in ("init", "upcycle")})

    @property
    def _trainable(self) -> list[str]:
        return [t for t in self.trainable.replace(" ", "").split(",") if t]

    @property
    def groups(self) -> list[str] | None:
        """The module groups that train, in TARGETS order; None: all."""
        names = self._trainable
        return None if names == ["all"] else [t for t in TARGETS if t in names]

    def validate(self) -> None:
        E = self.train.expert_parallel
        check(self.model.experts % E == 0, f"train.expert_parallel={E} must divide the {self.model.experts} experts "
                                           f"of each layer")
        names = self._trainable
        check(names == ["all"] or (bool(names) and all(t in TARGETS for t in names)),
              f"trainable must be 'all' or a comma-separated subset of {','.join(TARGETS)}, got {self.trainable!r}")
        check(not (self.chat and self.llava), "chat and llava are two data formats: set one")
        check(self.llava or (self.images is None and not self.skip_bad),
              "images and skip_bad are settings of LLaVA-format data (llava=true)")
        check(self.aspect in ("pad", "resize"), f"aspect must be pad or resize, got {self.aspect!r}")
        check(self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}")
        check(self.warmup_ratio is None or 0 <= self.warmup_ratio < 1,
              f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")

    def fit_to_data(self, n_train: int) -> None:
        """train.steps from `epochs` and train.warmup_steps from `warmup_ratio`, where they are set."""
        t = self.train
        if self.epochs > 0:
            t.steps = max(1, math.ceil(self.epochs * n_train / (t.batch_size * t.grad_accum)))
        if self.warmup_ratio is not None:
            t.warmup_steps = math.ceil(self.warmup_ratio * t.steps)


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



def _vlm_stage(trainable: str, upcycle: bool, lr: float, batch_size: int) -> FinetuneConfig:
    """Table 10's stage on LLaVA-format data: one epoch, 4 GPUs as 4 accumulation steps, 2,048 tokens."""
    return FinetuneConfig(
        model=FinetuneModel(experts=4, top_k=2, router="competesmoe", targets="vision,connector", upcycle=upcycle),
        data=DataConfig(seq_len=2048), llava=True, trainable=trainable, epochs=1.0, warmup_ratio=0.03,
        train=TrainConfig(out_dir="runs/vlm", batch_size=batch_size, grad_accum=4, lr=lr, min_lr_ratio=0.0,
                          weight_decay=0.0, grad_clip=1.0, precision="bf16", eval_every=500, ckpt_every=500,
                          schedule=ScheduleConfig(omega=0.07, a_max=9, warmup=0.05, seed=42)))


VLM_STAGES = ("vlm-pt", "vlm-pft", "vlm-vit")
FINETUNE_PRESETS.update({
    "vlm-pt": _vlm_stage("connector", upcycle=False, lr=1e-3, batch_size=64),
    "vlm-pft": _vlm_stage("vision,connector,language", upcycle=False, lr=2e-6, batch_size=6),
    "vlm-vit": _vlm_stage("vision,connector,language", upcycle=True, lr=4e-6, batch_size=5),
})


def finetune_preset(name: str, overrides: list[str] | dict | None = None) -> FinetuneConfig:
    check(name in FINETUNE_PRESETS, f"unknown finetune preset {name!r}; choose from {sorted(FINETUNE_PRESETS)}")
    return apply_overrides(FINETUNE_PRESETS[name], overrides or {})


# --- a Hugging Face model behind the MoETransformer interface ----------------------------------------
class HFCausalLM(nn.Module):
    """`forward(input_ids, targets, **inputs) -> LMOutput` for a transformers causal LM or LLaVA-style VLM,
    upcycled or dense (weights under `hf.`).

    Takes the trainer's `batch[:, :-1], batch[:, 1:]` with chat masks encoded as ~id (`data.chat.unmask`),
    or a VLM batch (`data.llava.training_batch`: targets already next-token, -100 where no loss).
    Its state dict names each tensor once (tied embeddings under the first name), as checkpoints store it."""

    # a Hugging Face model may hold trainable weights its forward never uses (a SigLIP tower's pooling head
    # and final norm under LLaVA): DDP must look for them each step
    may_skip_parameters = True

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf, self.cfg = hf, hf.config
        self.register_state_dict_post_hook(_drop_tied)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, compete: bool | None = None,
                **inputs: Any) -> LMOutput:
        """`inputs`: what else the model takes (a VLM batch's attention_mask and pixel_values)."""
        if compete is not None:
            raise ValueError("compete= is not supported for Hugging Face models: the attached schedule decides")
        if targets is not None:
            input_ids, targets = unmask(input_ids, targets)
        out = self.hf(input_ids=input_ids, use_cache=False, **inputs)
        moe = list(getattr(self.hf, "moe_outputs", []))       # a dense model (VLM PT/PFT stages) has none
        aux = out.aux_loss if moe else out.logits.new_zeros((), dtype=torch.float32)
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


def as_configured(hf: nn.Module, cfg: FinetuneConfig, log: Callable[[str], None] = print) -> nn.Module:
    """The Hugging Face model as `cfg` trains it: an upcycled one keeps its structure and takes cfg's
    competition, losses and dispatch (`_use_settings`, recorded in its config); a dense one is upcycled
    with `cfg.spec`, unless `model.upcycle=false`."""
    spec = cfg.spec
    if is_upcycled(hf):
        _use_settings(hf, spec)
        saved = hf.config.competesmoe["upcycle"].get("targets", "language")   # the structure it was built with
        hf.config.competesmoe["upcycle"] = {**spec.to_dict(), "targets": saved}   # saved with the final model
    elif cfg.model.upcycle:
        hf = upcycle(hf, spec)
        log(f"upcycled {cfg.model.init}: {spec.experts} experts, K {spec.top_k}, router {spec.router}, "
            f"targets {hf.config.competesmoe['upcycle']['targets']}")
    return hf


def build(cfg: FinetuneConfig, log: Callable[[str], None] = print, writes: bool = True):
    """(config to record, model for the Trainer, data or None, writer of the final HF folder from a full state
    dict). `writes`: this process writes the run folder's files (rank 0 under torchrun)."""
    init, spec = cfg.model.init, cfg.spec
    check(init != "", "finetune needs a model to start from (model.init: a folder, run or hub name)")
    check(cfg.data.train != "synthetic", "finetune needs data (data.train: a text or chat file/folder)")
    for f in (cfg.data.train, cfg.data.valid) if cfg.llava else ():   # before loading a large model
        if f is not None and not Path(f).is_file():
            raise DataError(f"{f}: no such file")
    have = init_spec(init)
    if have is not None:
        _check_structure(spec, have, init)
    if is_competesmoe_source(init):
        from ..model.hf import hf_tokenizer, save_hf
        from ..model.transformer import MoETransformer
        from ..files import atomic_write
        from .runs import load_weights
        if cfg.chat or cfg.llava:
            raise UpcycleError("chat or LLaVA data with a competesmoe model is not supported (its tokenizer has no "
                               "chat template, it has no vision encoder); fine-tune it on text")
        model, tok = load_competesmoe(init, log=log)
        if model.cfg.dense and cfg.model.upcycle:
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
    hf = as_configured(load_dense_hf(init), cfg, log)
    if cfg.groups is not None:
        counts = freeze(hf, cfg.groups)
        log("parameters: " + ", ".join(f"{g} {counts[g]:,}" for g in TARGETS) + f"; training {counts['trainable']:,} "
            f"({', '.join(cfg.groups)}), the rest frozen")
    max_pos = getattr(hf.config.get_text_config(), "max_position_embeddings", None)
    check(max_pos is None or cfg.data.seq_len <= max_pos,
          f"data.seq_len={cfg.data.seq_len} exceeds the model's max_position_embeddings={max_pos}")
    data, saver = _hf_data(cfg, init, log)
    cfg.fit_to_data(data.n_train)
    if cfg.epochs > 0:
        log(f"{cfg.epochs:g} epoch(s) of {data.n_train:,} training samples: {cfg.train.steps:,} steps, "
            f"{cfg.train.warmup_steps:,} of warm-up")

    def write_hf(state: dict, folder: Path) -> None:   # the full weights, whatever the run's layout
        hf.save_pretrained(str(folder), state_dict={k[len("hf."):]: v for k, v in state.items()})
        saver.save_pretrained(str(folder))
    return cfg, HFCausalLM(hf), data, write_hf


def _hf_data(cfg: FinetuneConfig, init: str, log: Callable[[str], None]):
    """(the data, what saves the tokenizer or processor with the final model) of a Hugging Face model."""
    if cfg.llava:
        from transformers import AutoProcessor
        from ..data.llava import load_llava_data
        processor = AutoProcessor.from_pretrained(init)
        d = cfg.data
        data = load_llava_data(d.train, d.valid, d.valid_fraction, processor, cfg.images, d.seq_len, cfg.aspect,
                               cfg.skip_bad)
        log(f"data: {data.summary()}")
        return data, processor
    from transformers import AutoTokenizer
    from ..data.chat import load_finetune_data
    tok = AutoTokenizer.from_pretrained(init)
    return load_finetune_data(cfg.data, tok, cfg.chat), tok


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
