"""lm-evaluation-harness support: the `competesmoe` model class and offline task YAMLs.

    python -m competesmoe.eval.lm_eval_adapter --model competesmoe --model_args pretrained=DIR \\
        --tasks competesmoe_piqa,competesmoe_lambada --include_path src/competesmoe/eval/lm_eval_tasks

is `lm_eval ...` with this module imported first (lm-eval has no plugin discovery, so a plain
`lm_eval --model competesmoe` does not know the class). In Python, import this module, then
`lm_eval.simple_evaluate(model="competesmoe", model_args={"pretrained": DIR}, ...)`.
`pretrained` is an exported folder (`competesmoe export`), a checkpoint or a run folder; other
model_args: batch_size, device (auto), max_gen_toks. `write_tasks(data_dir, out_dir)` renders the task YAMLs for
another data folder, with one task per BLiMP paradigm and the group `competesmoe_blimp`.
lm-eval is optional: `pip install competesmoe[eval]`.
"""
from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

try:
    import lm_eval  # noqa: F401
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("competesmoe.eval.lm_eval_adapter needs lm-evaluation-harness: "
                      "pip install 'competesmoe[eval]' (or pip install lm_eval)") from e

import torch

from .scoring import Scorer

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
DEFAULT_DATA = "../shared/data/eval"
BLIMP_GROUP = "competesmoe_blimp"


@register_model("competesmoe")
class CompeteSMoELM(LM):
    """An lm-eval LM over a checkpoint, run or exported folder, scored by `competesmoe.eval.Scorer`
    (right-padded batches, left truncation to max_length, the EOS token as the empty-context prefix,
    as lm-eval's HFLM) so that its numbers equal `competesmoe eval`'s on the same requests."""

    def __init__(self, pretrained: str, batch_size: int | str | None = 8, device: str | None = "auto",
                 max_gen_toks: int = 256, **kwargs: Any) -> None:
        super().__init__()
        from ..train.runs import resolve_device
        from .cli import load_model
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # lm_eval's CLI defaults to cuda; HFLM falls back the same way
        self._device = resolve_device(str(device or "auto"))
        model, tok, _, max_length, eos = load_model(pretrained, str(self._device))
        self.net = getattr(model, "model", model)  # the MoETransformer (inside the HF wrapper)
        self.tokenizer = tok
        bs = 8 if batch_size is None or str(batch_size).startswith("auto") else int(batch_size)
        self.scorer = Scorer(self.net, tok, max_length=max_length, prefix_token_id=eos, batch_size=bs,
                             device=self._device, progress=False)
        self.max_gen_toks = int(max_gen_toks)

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self.scorer.loglikelihood([req.args for req in requests], "lm-eval loglikelihood")

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        tokens = [self.scorer.encode(req.args[0]) for req in requests]
        return self.scorer.rolling_loglikelihood(tokens, desc="lm-eval rolling")

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    @torch.no_grad()
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation (KV cache), cut at the first stop string."""
        out = []
        limit = self.scorer.max_length
        for req in requests:
            context, gen_kwargs = req.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            new = max(1, min(int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)), limit - 1))
            ids = (self.scorer.encode(context) or [self.scorer.prefix_token_id])[-(limit - new):]
            x = torch.tensor([ids], device=self._device)
            text = self._decode(self.net.generate(x, new)[0, len(ids):].tolist())
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            out.append(text)
        return out


def _render(text: str, data_dir: str) -> str:
    return text.replace(DEFAULT_DATA, data_dir.rstrip("/"))


def write_tasks(data_dir: str | Path, out_dir: str | Path) -> Path:
    """Copy the task YAMLs into `out_dir` with their data files under `data_dir` (absolute), adding one
    task per BLiMP paradigm found in `data_dir/blimp` and the group `competesmoe_blimp` (mean over
    paradigms, unweighted, as `competesmoe eval`). Returns `out_dir`, for `--include_path`."""
    data = str(Path(data_dir).expanduser().resolve())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for src in TASKS_DIR.iterdir():
        if src.is_file() and (src.suffix in (".yaml", ".py") or src.name.endswith("_yaml")):
            if src.suffix == ".py":
                shutil.copy(src, out / src.name)
            elif not src.name.startswith("competesmoe_blimp_"):
                (out / src.name).write_text(_render(src.read_text(), data))
    pattern = (TASKS_DIR / "competesmoe_blimp_adjunct_island.yaml").read_text()
    names = []
    blimp = Path(data) / "blimp"
    for path in sorted(blimp.glob("*.jsonl*")) if blimp.is_dir() else []:
        paradigm = re.sub(r"\.jsonl(\.gz)?$", "", path.name)
        text = _render(pattern, data).replace("adjunct_island.jsonl.gz", path.name).replace("adjunct_island", paradigm)
        (out / f"competesmoe_blimp_{paradigm}.yaml").write_text(text)
        names.append(f"competesmoe_blimp_{paradigm}")
    if names:
        tasks = "\n".join(f"  - {n}" for n in names)
        (out / "_competesmoe_blimp.yaml").write_text(
            f"group: {BLIMP_GROUP}\ntask:\n{tasks}\naggregate_metric_list:\n  - metric: acc\n"
            f"    aggregation: mean\n    weight_by_size: false\nmetadata:\n  version: 1.0\n")
    return out


def main(argv: list[str] | None = None) -> None:
    """`lm_eval` with the `competesmoe` model registered. `--data-dir DIR` (ours, optional) renders the
    tasks for DIR into a temporary folder and adds it to `--include_path`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--data-dir" in argv:
        i = argv.index("--data-dir")
        data_dir = argv[i + 1]
        del argv[i:i + 2]
        tasks = write_tasks(data_dir, tempfile.mkdtemp(prefix="competesmoe_tasks_"))
        argv += ["--include_path", str(tasks)]
    from lm_eval.__main__ import cli_evaluate
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
