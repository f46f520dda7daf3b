"""`competesmoe vlm STAGE SRC --data D --images I --out O`: one of the paper's vision-language training
stages (Appendix I.1, Table 10) on a LLaVA-style model, as a `competesmoe finetune` preset.

    competesmoe vlm vlm-pt  my-llava    --data blip_558k.json  --images imgs/ --out runs/pt    # connector only
    competesmoe vlm vlm-pft runs/pt/hf  --data allava.json     --images imgs/ --out runs/pft   # everything, dense
    competesmoe vlm vlm-vit runs/pft/hf --data mix665k.json    --images imgs/ --out runs/vit   # upcycled, competing

Each stage is the `finetune` preset of the same name (`train/finetune.py`: the table of stages) on
LLaVA-format data (`data/llava.py`), trained by the project's `Trainer`: progress bar, metrics, bf16,
atomic checkpoints with bit-exact `--resume`, torchrun with DDP, FSDP2 per decoder and vision-encoder
layer (`--set train.parallel=fsdp`) and expert parallelism (`--set train.expert_parallel=E`). The model
is written to OUT/hf with its processor: the next stage's SRC. Any `FinetuneConfig` value may be set:
`--set train.lr=2e-5`, `--set model.router=smoe`, `--set schedule.omega=0.1`, `--steps 100` (instead of
one epoch).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from . import finetune_cli
from .finetune import VLM_STAGES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("stage", choices=VLM_STAGES, help="Table 10's stage (the finetune preset of that name)")
    finetune_cli.add_arguments(p, vlm=True)


def main(args: argparse.Namespace) -> int:
    resuming = args.resume and args.out is not None and (Path(args.out) / "finetune.yaml").is_file()
    args.preset = None if resuming else args.stage   # a resumed stage continues as saved
    return finetune_cli.main(args)
