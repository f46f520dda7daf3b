"""lmms-eval, the harness of the paper's VLM benchmarks (Table 1: MME, MMBench, ...), scoring upcycled LLaVA
folders (`competesmoe upcycle` OUT, a `competesmoe vlm` run's RUN/hf).

    pip install 'lmms-eval>=0.7.3,<0.8' decord 'filelock<4'   # optional; not in constraints.txt (docs/vlm.md)
    python -m lmms_eval --model competesmoe_llava --model_args pretrained=runs/vit/hf --tasks mme --batch_size 1

lmms-eval's own `llava_hf` model looks the folder's `model_type` up in a fixed table, which
`competesmoe_upcycled` is not in. This package's entry point (group `lmms_eval.models`, pyproject.toml)
registers `competesmoe_llava`: `llava_hf` unchanged (prompting, generation, log-likelihood, batching) with
the model loaded by `AutoModelForImageTextToText` after `import competesmoe`, which rebuilds the upcycled
class with its MoE layers. Dense LLaVA folders load as under `llava_hf`.
"""
from __future__ import annotations

MODEL_ID = "competesmoe_llava"


def manifests() -> list:
    """The `lmms_eval.models` entry point: where lmms-eval finds the model class (imported only when used)."""
    from lmms_eval.models.registry_v2 import ModelManifest
    return [ModelManifest(model_id=MODEL_ID, simple_class_path="competesmoe.eval.lmms_llava.CompeteSMoELlava")]


__all__ = ["MODEL_ID", "manifests"]
