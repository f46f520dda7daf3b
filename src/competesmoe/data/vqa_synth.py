"""A synthetic visual question answering set in LLaVA format: coloured shapes on a grid, three kinds of question.

    write_vqa("data/vqa", n_train=3000, n_valid=300, n_test=600, seed=0, size=32)
    # data/vqa/{train,valid,test}.jsonl + data/vqa/images/<split>-<i>.png

Each image (size x size pixels, white background) holds 1-4 shapes (square, circle, triangle), each in its
own cell of a 3 x 2 grid, in red, green or blue. Questions (one per sample, kinds in turn):

* colour: "what colour is the square?" (the shape occurs once) -> "red" / "green" / "blue";
* count: "how many circles?" -> "zero" ... "four";
* relation: "is the triangle left of the circle?" (both occur once, in different columns) -> "yes" / "no".

Every split has its own seed (seed, seed + 1, seed + 2), so the splits are fixed and disjoint draws.
`ANSWERS[kind]` are the candidate answers the accuracy in `eval.vqa` chooses from.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

SHAPES = ("square", "circle", "triangle")
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 30), "blue": (30, 60, 220)}
NUMBERS = ("zero", "one", "two", "three", "four")
ANSWERS = {"colour": tuple(COLOURS), "count": NUMBERS, "relation": ("yes", "no")}
COLS, ROWS = 3, 2
VOCAB = sorted({"what", "colour", "is", "the", "how", "many", "left", "of", "?", *SHAPES, *(s + "s" for s in SHAPES),
                *COLOURS, *NUMBERS, "yes", "no"})


def _scene(rng: random.Random) -> list[tuple[str, str, int, int]]:
    """(shape, colour, column, row) of 1-4 shapes in distinct cells."""
    cells = rng.sample([(c, r) for c in range(COLS) for r in range(ROWS)], rng.randint(1, 4))
    return [(rng.choice(SHAPES), rng.choice(list(COLOURS)), c, r) for c, r in cells]


def draw(scene: list[tuple[str, str, int, int]], size: int = 32):
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    cw, ch = size / COLS, size / ROWS
    for shape, colour, c, r in scene:
        m = 0.15 * min(cw, ch)
        x0, y0, x1, y1 = c * cw + m, r * ch + m, (c + 1) * cw - m, (r + 1) * ch - m
        fill = COLOURS[colour]
        if shape == "square":
            d.rectangle([x0, y0, x1, y1], fill=fill)
        elif shape == "circle":
            d.ellipse([x0, y0, x1, y1], fill=fill)
        else:
            d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return img


def question(scene: list[tuple[str, str, int, int]], kind: str, rng: random.Random) -> tuple[str, str] | None:
    """(question, answer) of `kind` about `scene`, or None when the scene has no such question."""
    counts = {s: sum(1 for x in scene if x[0] == s) for s in SHAPES}
    once = [x for x in scene if counts[x[0]] == 1]
    if kind == "colour":
        if not once:
            return None
        shape, colour, _, _ = rng.choice(once)
        return f"what colour is the {shape} ?", colour
    if kind == "count":
        shape = rng.choice(SHAPES)
        return f"how many {shape}s ?", NUMBERS[counts[shape]]
    pairs = [(a, b) for a in once for b in once if a[0] != b[0] and a[2] != b[2]]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    return f"is the {a[0]} left of the {b[0]} ?", "yes" if a[2] < b[2] else "no"


def generate(n: int, seed: int, size: int = 32, prefix: str = "s"):
    """n (sample, image, kind) triples; the question kinds in turn (colour, count, relation)."""
    rng = random.Random(seed)
    kinds = list(ANSWERS)
    out = []
    while len(out) < n:
        kind = kinds[len(out) % len(kinds)]
        scene = _scene(rng)
        qa = question(scene, kind, rng)
        if qa is None:
            continue
        i = len(out)
        sample = {"id": f"{prefix}-{i}", "image": f"{prefix}-{i}.png", "kind": kind, "conversations": [
            {"from": "human", "value": f"<image>\n{qa[0]}"}, {"from": "gpt", "value": qa[1]}]}
        out.append((sample, draw(scene, size)))
    return out


def write_vqa(out: str | Path, n_train: int = 3000, n_valid: int = 300, n_test: int = 600, seed: int = 0,
              size: int = 32) -> Path:
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for k, (split, n) in enumerate((("train", n_train), ("valid", n_valid), ("test", n_test))):
        rows = []
        for sample, img in generate(n, seed + k, size, split):
            img.save(out / "images" / sample["image"])
            rows.append(json.dumps(sample))
        (out / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    return out


__all__ = ["generate", "write_vqa", "draw", "question", "ANSWERS", "SHAPES", "COLOURS", "NUMBERS", "VOCAB"]
