"""`competesmoe <command>`: a thin dispatcher.

Each command lives in its own module, which defines `add_arguments(parser)` and `main(args) -> int`.
Modules are imported only when their command runs, so `competesmoe --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("competesmoe.train.cli", "pre-train a language model with any router"),
    "eval": ("competesmoe.eval.cli", "perplexity and zero-shot evaluation of a checkpoint"),
    "export": ("competesmoe.model.export", "turn a training checkpoint into a Hugging Face folder"),
    "analyze": ("competesmoe.analysis.cli", "routing analysis: ECR, agreement, entropy, top-(K+1) shift"),
    "compare": ("competesmoe.analysis.compare", "train several routers under identical settings and tabulate"),
    "theory": ("competesmoe.theory.cli", "simulate the convergence rates of Section 3"),
}


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
    cmd = argparse.ArgumentParser(prog=f"competesmoe {argv[0]}", description=COMMANDS[argv[0]][1],
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    module.add_arguments(cmd)
    return int(module.main(cmd.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    sys.exit(main())
