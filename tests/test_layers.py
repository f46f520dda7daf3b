"""The package reads top-down: config → data → moe/model → train → eval → analysis → CLI.

Every `competesmoe` import of every module is checked against that order, command modules included: a
package's `cli.py` or `*_cli.py` belongs to its package's layer (so `train/upcycle_cli.py`, not
`model/`, since it loads runs). Only the top-level dispatcher (`cli.py`, `__main__.py`) may import anything.
"""
import ast
from pathlib import Path

import competesmoe

ROOT = Path(competesmoe.__file__).parent
LAYER = {"errors": 0, "files": 0, "config": 0, "plots": 0, "data": 1, "moe": 2, "model": 3, "train": 4, "eval": 5,
         "analysis": 6, "theory": 6}
TOP = 99


def _imports(source: str, package: list[str]) -> list[str]:
    """The top-level `competesmoe` subpackage or module of each import in `source`, a module of `package`
    (e.g. ["model"]; [] at the top), absolute or relative."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - (node.level - 1)]
            target = base + (node.module.split(".") if node.module else [a.name for a in node.names[:1]])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("competesmoe."):
            target = node.module.split(".")[1:]
        elif isinstance(node, ast.Import):
            target = [a.name.split(".")[1] for a in node.names if a.name.startswith("competesmoe.")][:1]
        else:
            continue
        if target:
            out.append(target[0])
    return out


def _layer(path: Path) -> int:
    rel = path.relative_to(ROOT)
    if len(rel.parts) == 1 and rel.stem not in LAYER:
        return TOP
    return LAYER[rel.parts[0] if len(rel.parts) > 1 else rel.stem]


def test_imports_run_top_down():
    backwards = [f"{p.relative_to(ROOT)} imports {name}" for p in sorted(ROOT.rglob("*.py"))
                 for name in _imports(p.read_text(), list(p.relative_to(ROOT).parent.parts))
                 if LAYER.get(name, -1) > _layer(p)]
    assert not backwards, "imports against the layer order:\n" + "\n".join(backwards)


def test_the_checker_resolves_every_import_form():
    source = ("from ..train.runs import load_trained\nimport competesmoe.eval.cli\nfrom competesmoe.analysis import x\n"
              "from . import hf\nfrom .transformer import MoETransformer\nimport torch\n")
    assert _imports(source, ["model"]) == ["train", "eval", "analysis", "model", "model"]
    assert _layer(ROOT / "model" / "hf.py") == LAYER["model"] < LAYER["train"]
    assert _layer(ROOT / "train" / "upcycle_cli.py") == LAYER["train"] < _layer(ROOT / "cli.py") == TOP
