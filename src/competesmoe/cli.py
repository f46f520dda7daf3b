"""`competesmoe <command>`: a thin dispatcher.

Each command lives in its own module, which defines `add_arguments(parser)` and `main(args) -> int`.
Modules are imported only when their command runs, so `competesmoe --help` stays fast. A
`CompeteSMoEError` (bad input) becomes one line on stderr and exit code 1; other exceptions keep
their traceback. Under torchrun every rank exits 1 and only rank 0 prints the line (torchrun then adds
its own summary of the failed workers).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import CompeteSMoEError

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("competesmoe.train.cli", "pre-train a language model with any router"),
    "eval": ("competesmoe.eval.cli", "perplexity and zero-shot evaluation of a checkpoint"),
    "export": ("competesmoe.train.export", "turn a training checkpoint into a Hugging Face folder"),
    "analyze": ("competesmoe.analysis.cli", "routing analysis: ECR, agreement, entropy, top-(K+1) shift"),
    "compare": ("competesmoe.analysis.compare", "train several routers under identical settings and tabulate"),
    "theory": ("competesmoe.theory.cli", "simulate the convergence rates of Section 3"),
    "recovery": ("competesmoe.theory.recovery", "expert recovery of the real MoE layer against the sample size"),
    "upcycle": ("competesmoe.train.upcycle_cli", "turn a dense model (Hugging Face or model.dense) into an MoE"),
    "finetune": ("competesmoe.train.finetune_cli", "fine-tune an upcycled (or dense, upcycled first) model with any router"),
    "vlm": ("competesmoe.train.vlm", "a LLaVA-style model's training stage: vlm-pt, vlm-pft, vlm-vit (Table 10)"),
}


def _rank0() -> bool:
    """Not under torchrun, or its rank 0: every rank fails alike, rank 0 says it once."""
    return os.environ.get("RANK", "0") == "0"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):   # a bad flag: argparse's usage + message (exit 2), from rank 0 only
        if _rank0():
            super().error(message)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="competesmoe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    cmd = _Parser(prog=f"competesmoe {argv[0]}", description=COMMANDS[argv[0]][1],
                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    module.add_arguments(cmd)
    args = cmd.parse_args(argv[1:])
    try:
        return int(module.main(args) or 0)
    except CompeteSMoEError as e:  # bad input: one line; anything else is a bug and keeps its traceback
        if _rank0():
            print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
