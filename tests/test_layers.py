"""The package reads top-down: config → data → moe/model → train → eval → analysis → CLI.

Every `competesmoe` import of every module is checked against that order, command modules included: a
package's `cli.py` or `*_cli.py` belongs to its package's layer (so `train/upcycle_cli.py`, not
`model/`, since it loads runs). Only the top-level dispatcher (`cli.py`, `__main__.py`) may import anything.
"""
import ast
import os
import subprocess
import sys
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


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})


def test_import_competesmoe_does_not_import_transformers():
    res = _python("import competesmoe, competesmoe.cli, sys; assert 'transformers' not in sys.modules, 'imported'")
    assert res.returncode == 0, res.stderr[-2000:]


def test_auto_classes_load_our_folders_after_import_competesmoe(tmp_path):
    """The registration waits for transformers: imported after competesmoe, it knows both model types."""
    import transformers
    from competesmoe.config import MoEConfig
    from competesmoe.data.tokenizer import train_bpe
    from competesmoe.model.hf import save_hf
    from competesmoe.model.transformer import ModelConfig, MoETransformer
    from competesmoe.model.upcycle import upcycle
    llama = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)
    upcycle(transformers.AutoModelForCausalLM.from_config(llama), experts=4).save_pretrained(tmp_path / "up")
    tok = train_bpe(["the cat sat on a mat"] * 20, 280)
    save_hf(MoETransformer(ModelConfig(vocab_size=tok.get_vocab_size(), n_layers=1, d_model=32, n_heads=4,
                                       max_seq_len=32, moe=MoEConfig(d_model=32, d_expert=16, n_experts=4, top_k=2))),
            tok, tmp_path / "export")
    res = _python("import competesmoe\n"
                  "from transformers import AutoModelForCausalLM as A\n"
                  f"print(type(A.from_pretrained({str(tmp_path / 'up')!r})).__name__, "
                  f"type(A.from_pretrained({str(tmp_path / 'export')!r})).__name__)")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["UpcycledLlamaForCausalLM", "CompeteSMoEForCausalLM"]
