"""Loaders for the offline zero-shot benchmark files (formats in ../shared/data/README.md).

Each loader takes the data directory and `limit` (first N items) and returns plain items; the
prompt formats follow lm-evaluation-harness (see `docs/eval.md`). Any problem with a file raises
`TaskDataError` naming the file (and line) and what is wrong.
"""
from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.sources import jsonl_values
from ..errors import CompeteSMoEError

DEFAULT_DATA_DIR = Path("../shared/data/eval")
FILES = {
    "lambada": "lambada_openai.jsonl",
    "piqa": "piqa.jsonl",
    "arc_easy": "arc_easy.jsonl",
    "arc_challenge": "arc_challenge.jsonl",
    "hellaswag": "hellaswag_val.jsonl",
    "blimp": "blimp",
    "wikitext2": "wikitext2",
}
MULTIPLE_CHOICE_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag")


class TaskDataError(CompeteSMoEError, ValueError):
    """A benchmark file is missing, empty or malformed."""


@dataclass(frozen=True)
class ChoiceItem:
    """Multiple choice: score `" " + choice` after `context`; `gold` indexes `choices`."""
    context: str
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class LambadaItem:
    """The target word follows the context after one space."""
    context: str
    target: str


@dataclass(frozen=True)
class BlimpPair:
    good: str
    bad: str


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """`data_dir`, or `../shared/data/eval` (relative to the current directory) when None."""
    if data_dir is None:
        if DEFAULT_DATA_DIR.is_dir():
            return DEFAULT_DATA_DIR.resolve()
        raise TaskDataError(f"no evaluation data directory given and the default {DEFAULT_DATA_DIR} "
                            f"does not exist (relative to {Path.cwd()}); pass --data-dir DIR (data_dir=...)")
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise TaskDataError(f"evaluation data directory {path} does not exist or is not a directory "
                            f"(check --data-dir)")
    return path


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise TaskDataError(f"benchmark file not found: {path} (check --data-dir)")
    return path


def read_jsonl(path: Path, fields: tuple[str, ...], limit: int | None = None) -> list[dict[str, Any]]:
    """Records of a `.jsonl` or `.jsonl.gz` file, each checked to have `fields`; blank lines skipped."""
    _existing(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    rows: list[dict[str, Any]] = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, row in jsonl_values(path, f, TaskDataError):
                if not isinstance(row, dict):
                    raise TaskDataError(f"{path}: line {lineno}: expected a JSON object, got {type(row).__name__}")
                missing = [k for k in fields if k not in row]
                if missing:
                    raise TaskDataError(f"{path}: line {lineno}: missing field(s) {missing}; expected {list(fields)}")
                rows.append(row)
                if limit is not None and len(rows) >= limit:
                    break
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise TaskDataError(f"cannot read {path}: {e}") from e
    if not rows:
        raise TaskDataError(f"{path}: no items (empty file)")
    return rows


def _text(path: Path, row: dict[str, Any], key: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise TaskDataError(f"{path}: field {key!r} must be a string, got {value!r:.80}")
    return value


def _choices(path: Path, row: dict[str, Any], key: str, gold_key: str) -> tuple[tuple[str, ...], int]:
    choices, gold = row[key], row[gold_key]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise TaskDataError(f"{path}: field {key!r} must be a list of at least 2 strings, got {choices!r:.80}")
    if isinstance(gold, str) and gold.strip().isdigit():  # HellaSwag labels are sometimes strings
        gold = int(gold)
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
        raise TaskDataError(f"{path}: field {gold_key!r}={gold!r} is not an index into {len(choices)} choices")
    return tuple(choices), gold


def load_lambada(data_dir: str | Path, limit: int | None = None) -> list[LambadaItem]:
    path = Path(data_dir) / FILES["lambada"]
    rows = read_jsonl(path, ("context", "continuation"), limit)
    return [LambadaItem(_text(path, r, "context"), _text(path, r, "continuation").strip()) for r in rows]


def load_multiple_choice(task: str, data_dir: str | Path, limit: int | None = None) -> list[ChoiceItem]:
    """PIQA / ARC-Easy / ARC-Challenge / HellaSwag items with the lm-eval prompt."""
    if task not in MULTIPLE_CHOICE_TASKS:
        raise ValueError(f"{task!r} is not a multiple-choice task; known: {MULTIPLE_CHOICE_TASKS}")
    path = Path(data_dir) / FILES[task]
    if task == "hellaswag":
        return [_hellaswag_item(path, r) for r in read_jsonl(path, ("activity_label", "endings", "label"), limit)]
    items = []
    for r in read_jsonl(path, ("query", "choices", "gold"), limit):
        query = _text(path, r, "query")
        # piqa queries end with "\n" ("Question: ...\n"), ARC queries do not: both give "...\nAnswer:"
        context = query + "Answer:" if task == "piqa" else query + "\nAnswer:"
        items.append(ChoiceItem(context, *_choices(path, r, "choices", "gold")))
    return items


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag text cleaning (WikiHow bracket artefacts, double spaces)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_item(path: Path, row: dict[str, Any]) -> ChoiceItem:
    if "ctx_a" in row and "ctx_b" in row:  # Hugging Face layout: exactly lm-eval's context
        ctx = _text(path, row, "ctx_a") + " " + _text(path, row, "ctx_b").capitalize()
    elif "ctx" in row:
        ctx = _text(path, row, "ctx")
    else:
        raise TaskDataError(f"{path}: a HellaSwag item needs 'ctx' (or 'ctx_a' and 'ctx_b'); got {sorted(row)}")
    choices, gold = _choices(path, row, "endings", "label")
    query = hellaswag_preprocess(_text(path, row, "activity_label") + ": " + ctx)
    return ChoiceItem(query, tuple(hellaswag_preprocess(e) for e in choices), gold)


def load_blimp(data_dir: str | Path, limit: int | None = None) -> dict[str, list[BlimpPair]]:
    """Paradigm name -> its first `limit` pairs, from `blimp/*.jsonl.gz` (or `*.jsonl`)."""
    folder = Path(data_dir) / FILES["blimp"]
    if not folder.is_dir():
        raise TaskDataError(f"BLiMP folder not found: {folder} (check --data-dir)")
    files = sorted(p for p in folder.iterdir() if p.name.endswith((".jsonl", ".jsonl.gz")))
    if not files:
        raise TaskDataError(f"{folder}: no BLiMP paradigm files (*.jsonl.gz)")
    paradigms: dict[str, list[BlimpPair]] = {}
    for path in files:
        name = path.name.removesuffix(".gz").removesuffix(".jsonl")
        rows = read_jsonl(path, ("sentence_good", "sentence_bad"), limit)
        paradigms[name] = [BlimpPair(_text(path, r, "sentence_good"), _text(path, r, "sentence_bad")) for r in rows]
    return paradigms


_HEADING = re.compile(r"^ = [^=].* = $")


def split_wikitext_articles(text: str) -> list[str]:
    """Split WikiText into articles at top-level headings (` = Title = `); one document if none."""
    docs: list[list[str]] = [[]]
    for line in text.splitlines(keepends=True):
        if _HEADING.match(line.rstrip("\n")) and any(s.strip() for s in docs[-1]):
            docs.append([])
        docs[-1].append(line)
    return [d for d in ("".join(lines) for lines in docs) if d.strip()]


def load_wikitext(data_dir: str | Path, split: str = "test", limit: int | None = None) -> list[str]:
    """The first `limit` articles of `wikitext2/{split}.txt` (tokenized text, as stored)."""
    path = _existing(Path(data_dir) / FILES["wikitext2"] / f"{split}.txt")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TaskDataError(f"cannot read {path}: {e}") from e
    docs = split_wikitext_articles(text)
    if not docs:
        raise TaskDataError(f"{path}: no text (empty file)")
    return docs[:limit] if limit is not None else docs


def wikitext_detokenize(string: str) -> str:
    """lm-eval's `wikitext_detokenizer` (undo WikiText's ` @-@ `, ` , ` ... tokenization)."""
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    string = string.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    for p in (":", ";", ".", "!", "?", ","):
        string = string.replace(f" {p} ", f"{p} ")
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    string = string.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    string = string.replace(" " + chr(176) + " ", chr(176))
    string = string.replace(" \n", "\n").replace("\n ", "\n")
    string = string.replace(" N ", " 1 ")
    return string.replace(" 's", "'s")


def count_words(text: str) -> int:
    """Words as lm-eval counts them for `word_perplexity`: `len(re.split(r"\\s+", text))`."""
    return len(re.split(r"\s+", text))
