"""`competesmoe_llava` for lmms-eval (imported by lmms-eval only, through `eval/lmms.py`'s entry point)."""
from __future__ import annotations

import os

from lmms_eval.models.simple import llava_hf
from transformers import AutoModelForImageTextToText

import competesmoe  # noqa: F401  (registers the upcycled classes with the Auto classes)
from ..model.upcycle import MODEL_TYPE


class CompeteSMoELlava(llava_hf.LlavaHf):
    """lmms-eval's `llava_hf`, loading an upcycled folder through `AutoModelForImageTextToText` (its table of
    model types gets `competesmoe_upcycled`); every other argument is `llava_hf`'s. On one process its
    default `device_map=""` becomes the device (transformers 5 refuses an empty device map)."""

    def __init__(self, pretrained: str, **kwargs) -> None:
        llava_hf.model_map.setdefault(MODEL_TYPE, AutoModelForImageTextToText)
        if kwargs.get("device_map", "") == "" and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            kwargs["device_map"] = kwargs.get("device", "cuda")
        super().__init__(pretrained=pretrained, **kwargs)
