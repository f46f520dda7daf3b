"""The paper's three vision–language training stages (Appendix I.1, Table 10) on LLaVA-style models.

    model = train_stage("vlm-pt", "my-llava", "llava.json", images="imgs/", out="runs/pt")      # connector only
    model = train_stage("vlm-pft", "runs/pt/final", "llava.json", images="imgs/", out="runs/pft")
    model = train_stage("vlm-vit", "runs/pft/final", "llava.json", images="imgs/", out="runs/vit",
                        overrides={"router": "competesmoe"})        # upcycled, then trained with the router

| stage | trained | MoE | lr (cosine) | batch (per GPU x 4 GPUs) | balance / z-loss |
|---|---|---|---|---|---|
| `vlm-pt` | connector | no | 1e-3 | 64 x 4 | 0 / 0 |
| `vlm-pft` | vision, connector, language | no | 2e-6 | 6 x 4 | 0 / 0 |
| `vlm-vit` | vision, connector, language | vision encoder + connector upcycled to 4 experts, top-2 | 4e-6 | 5 x 4 | 0.01 / 0.001 |

All stages: AdamW, 2,048 tokens at most per sample, bf16 where the device has it, warm-up 3% of the steps
(LLaVA-1.5's `warmup_ratio`); VIT: ω 0.07, A_max 9, SMoE warm-up 5% (Section 2.4), router N(0, 0.02) seed
42. The 4 GPUs are emulated by 4 gradient-accumulation steps (`grad_accum`), so one optimizer step sees the
paper's global batch.

Freezing is by module group, found by structure (`model.upcycle`): vision = the `vision_tower`,
connector = the `multi_modal_projector`, language = everything else (the language model, its head).
A frozen parameter has `requires_grad=False`, so the optimizer (transformers' `Trainer`, which builds
AdamW over trainable parameters only) never holds it. Training runs through `transformers.Trainer` (its
checkpoints and `resume_from_checkpoint`: data order, RNG and optimizer state restored) with the
`CompetitionCallback` for an MoE stage.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..config import Config, ScheduleConfig, apply_overrides, check
from ..model.upcycle import TARGETS, UpcycleConfig, _part, is_upcycled, upcycle


@dataclass
class VLMStage(Config):
    trainable: str = "vision,connector,language"   # module groups that train; the others are frozen
    upcycle: bool = False                          # upcycle (vision encoder + connector) before training
    lr: float = 4e-6
    batch_size: int = 5                            # per device (Table 10: per GPU)
    grad_accum: int = 4                            # Table 10's 4 GPUs
    max_length: int = 2048                         # Table 10: maximum tokens
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    epochs: float = 1.0
    steps: int = -1                                # > 0: a fixed number of optimizer steps instead of epochs
    precision: str = "auto"                        # auto: bf16 where supported, else fp32; or bf16 / fp32
    device: str = "auto"                           # auto: the Trainer's choice (CUDA when there is one); cpu
    seed: int = 42
    save_steps: int = 500
    logging_steps: int = 10
    aspect: str = "pad"                            # LLaVA-1.5's image_aspect_ratio
    model: UpcycleConfig = field(default_factory=lambda: UpcycleConfig(targets="vision,connector"))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(omega=0.07, a_max=9, warmup=0.05, seed=42))

    def validate(self) -> None:
        names = [t for t in self.trainable.replace(" ", "").split(",") if t]
        check(bool(names) and all(t in TARGETS for t in names),
              f"trainable must be a comma-separated subset of {','.join(TARGETS)}, got {self.trainable!r}")
        check(self.lr > 0 and self.batch_size >= 1 and self.grad_accum >= 1 and self.max_length >= 1,
              "lr, batch_size, grad_accum and max_length must be positive")
        check(self.precision in ("auto", "bf16", "fp32"), f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        check(self.device in ("auto", "cpu"), f"device must be auto (the Trainer's choice) or cpu, got {self.device!r}")

    @property
    def groups(self) -> list[str]:
        return [t for t in TARGETS if t in self.trainable.replace(" ", "").split(",")]


# Appendix I.1, Table 10 (batch per GPU on 4 GPUs -> 4 accumulation steps); Table 11: 4 experts, top-2.
VLM_PRESETS: dict[str, VLMStage] = {
    "vlm-pt": VLMStage(trainable="connector", lr=1e-3, batch_size=64,
                       model=UpcycleConfig(targets="vision,connector", losses=dataclasses.replace(
                           UpcycleConfig().losses, balance_coef=0.0, zloss_coef=0.0))),
    "vlm-pft": VLMStage(trainable="vision,connector,language", lr=2e-6, batch_size=6,
                        model=UpcycleConfig(targets="vision,connector", losses=dataclasses.replace(
                            UpcycleConfig().losses, balance_coef=0.0, zloss_coef=0.0))),
    "vlm-vit": VLMStage(trainable="vision,connector,language", upcycle=True, lr=4e-6, batch_size=5),
}


def vlm_preset(name: str, overrides: list[str] | dict | None = None) -> VLMStage:
    check(name in VLM_PRESETS, f"unknown VLM stage {name!r}; choose from {sorted(VLM_PRESETS)}")
    return apply_overrides(VLM_PRESETS[name], overrides or {})


# --- module groups and freezing --------------------------------------------------------------------
def param_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """(name, parameter) per group: vision (the vision tower), connector (the projector), language (the rest)."""
    vision, connector = _part(model, "vision_tower"), _part(model, "multi_modal_projector")
    if vision is None or connector is None:
        raise ValueError(f"{type(model).__name__} is not a LLaVA-style model (no vision_tower / multi_modal_projector)")
    ids = {"vision": {id(p) for p in vision.parameters()}, "connector": {id(p) for p in connector.parameters()}}
    out: dict[str, list] = {t: [] for t in TARGETS}
    for name, p in model.named_parameters():
        group = next((g for g, s in ids.items() if id(p) in s), "language")
        out[group].append((name, p))
    return out


def freeze(model: nn.Module, trainable: list[str]) -> dict[str, int]:
    """requires_grad = (the parameter's group is in `trainable`); returns parameters per group, and how
    many train."""
    counts = {}
    for group, params in param_groups(model).items():
        for _, p in params:
            p.requires_grad_(group in trainable)
        counts[group] = sum(p.numel() for _, p in params)
    counts["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return counts


# --- one stage -------------------------------------------------------------------------------------
class _Samples(torch.utils.data.Dataset):
    def __init__(self, samples: list) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        return self.samples[i]


def _use_cpu(stage: VLMStage) -> bool:
    return stage.device == "cpu" or not torch.cuda.is_available()


def _bf16(stage: VLMStage) -> bool:
    if stage.precision != "auto":
        return stage.precision == "bf16"
    return not _use_cpu(stage) and torch.cuda.is_bf16_supported()


def load_vlm(src: str | Path):
    """(model, processor) of a LLaVA-style folder (dense or upcycled)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    return AutoModelForImageTextToText.from_pretrained(str(src)), AutoProcessor.from_pretrained(str(src))


def make_trainer(stage: VLMStage, model: nn.Module, processor: Any, samples: list, out: str | Path,
                 callbacks: list | None = None):
    """A `transformers.Trainer` for `stage` (model already frozen/upcycled as the stage says)."""
    from transformers import TrainingArguments
    from ..data.llava import collate
    from .hf_callback import CompetitionCallback
    pad = processor.tokenizer.pad_token_id
    pad = pad if pad is not None else processor.tokenizer.eos_token_id
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=stage.batch_size, gradient_accumulation_steps=stage.grad_accum,
        learning_rate=stage.lr, lr_scheduler_type="cosine", warmup_steps=float(stage.warmup_ratio),  # a float < 1: a ratio
        weight_decay=stage.weight_decay, num_train_epochs=stage.epochs, max_steps=stage.steps,
        bf16=_bf16(stage), logging_steps=stage.logging_steps, save_steps=stage.save_steps,
        seed=stage.seed, data_seed=stage.seed, report_to=[], remove_unused_columns=False,
        dataloader_num_workers=0, use_cpu=_use_cpu(stage), disable_tqdm=True)
    cbs = list(callbacks or [])
    if is_upcycled(model) and any(True for _ in _moe(model)):
        cbs.append(CompetitionCallback(stage.schedule))
    return _trainer_class()(model=model, args=args, train_dataset=_Samples(samples),
                            data_collator=lambda batch: collate(batch, pad), callbacks=cbs)


def _trainer_class():
    from transformers import Trainer

    class VLMTrainer(Trainer):
        """`Trainer` whose resume reads the checkpoint's weights through `from_pretrained`.

        A LLaVA model is saved with transformers' legacy key names (`language_model.model.*`,
        `vision_tower.*`, reversed from its checkpoint key mapping); `Trainer._load_from_checkpoint` loads
        the raw file with `load_state_dict(strict=False)`, so on a resume the renamed weights silently kept
        their current values. Here every weight must be found (strict)."""

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
            model = model if model is not None else self.model
            ref = next(model.parameters())
            saved = type(model).from_pretrained(resume_from_checkpoint, dtype=ref.dtype)
            model.load_state_dict(saved.state_dict(), strict=True)

    return VLMTrainer


def _moe(model: nn.Module):
    from ..moe import moe_layers
    return moe_layers(model)


def prepare(stage: VLMStage, model: nn.Module, log: Callable[[str], None] = print) -> nn.Module:
    """Upcycle (VIT) and freeze as the stage says."""
    if stage.upcycle and not is_upcycled(model):
        model = upcycle(model, stage.model)
        log(f"upcycled: targets {model.config.competesmoe['upcycle']['targets']}, {stage.model.experts} experts, "
            f"top-{stage.model.top_k}, router {stage.model.router}")
    counts = freeze(model, stage.groups)
    log("parameters: " + ", ".join(f"{g} {counts[g]:,}" for g in TARGETS) + f"; training {counts['trainable']:,} "
        f"({', '.join(stage.groups)})")
    return model


def train_stage(stage: str | VLMStage, src: str | Path, data: str | Path, images: str | Path | None, out: str | Path,
                overrides: list[str] | dict | None = None, resume: bool = False, skip_bad: bool = False,
                log: Callable[[str], None] = print) -> Path:
    """Train one stage from the model folder `src` on LLaVA-format `data`; the model (and processor) are
    written to OUT/final. Returns that folder."""
    from ..data.llava import load_llava
    stage = vlm_preset(stage, overrides) if isinstance(stage, str) else apply_overrides(stage, overrides or {})
    model, processor = load_vlm(src)
    model = prepare(stage, model, log)
    vd = load_llava(data, processor, images, max_length=stage.max_length, aspect=stage.aspect, skip_bad=skip_bad)
    log(f"data: {vd.summary()}")
    trainer = make_trainer(stage, model, processor, vd.samples, out)
    trainer.train(resume_from_checkpoint=True if resume else None)
    final = Path(out) / "final"
    trainer.model.save_pretrained(str(final))
    processor.save_pretrained(str(final))
    return final


def steps_per_epoch(n_samples: int, stage: VLMStage) -> int:
    return max(1, math.ceil(n_samples / stage.batch_size) // stage.grad_accum)


def add_arguments(p) -> None:
    p.add_argument("stage", choices=sorted(VLM_PRESETS), help="Table 10's stage")
    p.add_argument("src", help="LLaVA-style model folder with its processor (the previous stage's OUT/final)")
    p.add_argument("--data", required=True, help="LLaVA-format JSON list or JSONL")
    p.add_argument("--images", help="folder the samples' \"image\" paths are relative to")
    p.add_argument("--out", required=True, help="output folder (Trainer checkpoints; the model in OUT/final)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any VLMStage value, e.g. lr=1e-4, steps=100, model.router=smoe, schedule.omega=0.1")
    p.add_argument("--resume", action="store_true", help="continue from OUT's newest checkpoint")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) bad samples instead of stopping")


def main(args: Any = None) -> int:
    """`competesmoe vlm STAGE SRC --data D --images I --out O` (or `python -m competesmoe.train.vlm ...`;
    `args`: parsed arguments or an argv list); errors as one line."""
    import argparse
    import sys
    from ..errors import CompeteSMoEError
    if args is None or isinstance(args, list):
        p = argparse.ArgumentParser(prog="competesmoe vlm", description=__doc__.split("\n")[0])
        add_arguments(p)
        args = p.parse_args(args)
    try:
        final = train_stage(args.stage, args.src, args.data, args.images, args.out, args.overrides, args.resume,
                            args.skip_bad)
    except (CompeteSMoEError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.stage}: model written to {final}")
    return 0


__all__ = ["VLMStage", "VLM_PRESETS", "vlm_preset", "param_groups", "freeze", "prepare", "make_trainer",
           "train_stage", "load_vlm"]


if __name__ == "__main__":
    raise SystemExit(main())
