"""Teaching transformers' Auto classes the model types "competesmoe" and "competesmoe_upcycled".

`import competesmoe` does not import transformers (several seconds; the CLI and the MoE layer do not need
it), yet `AutoModelForCausalLM.from_pretrained(folder)` must work after it, whichever of the two packages
was imported first. So the registration runs as soon as both are there: at once if transformers is
already imported, else right after its first import (a one-shot import hook; it then removes itself).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

_MODULES = ("competesmoe.model.hf", "competesmoe.model.upcycle")   # each registers its model type on import


def register() -> None:
    for name in _MODULES:
        importlib.import_module(name)


class _AfterTransformers(importlib.abc.MetaPathFinder):
    """Finds `transformers` with the ordinary finders, and registers once its module has run."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)   # one shot; also keeps the lookup below from coming back here
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                register()
            spec.loader.exec_module = exec_module
        return spec


def register_when_transformers_is_imported() -> None:
    if "transformers" in sys.modules:
        register()
    elif not any(isinstance(f, _AfterTransformers) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformers())
