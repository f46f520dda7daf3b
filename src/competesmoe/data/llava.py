"""LLaVA-format visual instruction data (LLaVA-1.5's `llava_v1_5_mix665k.json`, the paper's VIT data,
Appendix I.1), encoded with the model's own processor.

A file is a JSON list or JSONL of samples

    {"id": "000001", "image": "coco/train2017/000001.jpg",            # optional; relative to --images DIR
     "conversations": [{"from": "human", "value": "<image>\\nWhat is in the picture?"},
                       {"from": "gpt", "value": "A cat."}, ...]}

* roles: "human"/"user" -> user, "gpt"/"assistant" -> assistant, "system" -> system; the conversation is
  rendered with the tokenizer's chat template (the processor's own when the tokenizer has none);
* the image is read with Pillow (RGB) and goes through the model's processor, which expands each `<image>`
  placeholder to as many image tokens as the vision tower yields (LLaVA: (size/patch)², minus CLS for
  the "default" feature strategy); `aspect="pad"` first pads the image to a square with the processor's
  mean colour (LLaVA-1.5's `image_aspect_ratio=pad`), `"resize"` lets the processor resize it as it is;
* the loss is on the assistant replies only: for reply i the targets are the tokens of
  render(messages[:i+1]) after render(messages[:i], add_generation_prompt=True), as in `data.chat`;
  every other token has label -100;
* truncation: a sample longer than `max_length` tokens (the tokenizer's `model_max_length`, or
  `data.seq_len`) keeps its first `max_length` tokens, as LLaVA does, unless the cut would fall inside
  an image's tokens (the image features would no longer match): that sample is bad input.

Bad input (a malformed line, no conversations, an unknown role, a missing or unreadable image, a
`<image>` count that does not match the images, no assistant reply, an image cut by truncation) raises a
`DataError` naming the sample; with `skip_bad=True` the sample is skipped and counted by reason.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .batches import BatchIterator
from .sources import DataError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE = "<image>"


@dataclass
class VisionSample:
    """One encoded sample: ids [S], labels [S] (-100: no loss), pixel_values [n_images, 3, H, W] or None.
    A lazily encoded sample (`lazy=True`) holds its image files instead (`image_paths`; pixel_values None
    until `pixels` reads them)."""
    id: str
    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None
    truncated: bool = False
    image_paths: tuple[Path, ...] = ()
    where: str = ""


@dataclass
class VisionData:
    samples: list[VisionSample]
    skipped: Counter = field(default_factory=Counter)   # reason -> count (skip_bad)
    truncated: int = 0

    def summary(self) -> str:
        bad = sum(self.skipped.values())
        text = f"{len(self.samples)} samples, {self.truncated} truncated"
        if bad:
            text += f", {bad} skipped (" + ", ".join(f"{r}: {n}" for r, n in sorted(self.skipped.items())) + ")"
        return text


class BadSample(DataError):
    def __init__(self, where: str, reason: str, detail: str) -> None:
        super().__init__(f"{where}: {detail}")
        self.reason = reason


def read_llava(path: str | Path) -> list[tuple[str, Any]]:
    """(where, sample object) of a JSON list or JSONL file; a malformed line is (where, BadSample)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not a valid JSON list ({e.msg} at line {e.lineno}, column {e.colno})") from None
        return [(f"{path}: item {i}", obj) for i, obj in enumerate(items)]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}: line {n}"
        try:
            out.append((where, json.loads(line)))
        except json.JSONDecodeError as e:
            out.append((where, BadSample(where, "malformed", f"not valid JSON ({e.msg} at column {e.colno})")))
    return out


def expand_to_square(img: Any, background: tuple[int, ...]) -> Any:
    """LLaVA-1.5's `expand2square`: the image centred on a square canvas of `background` colour."""
    from PIL import Image
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), background)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def _messages(obj: Any, where: str) -> list[dict]:
    conv = obj.get("conversations") if isinstance(obj, dict) else None
    if not isinstance(conv, list) or not conv:
        raise BadSample(where, "empty conversation", "no conversation (expected \"conversations\": [{\"from\": "
                                                     "\"human\", \"value\": ...}, {\"from\": \"gpt\", ...}])")
    msgs = []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in ROLES:
            raise BadSample(where, "malformed turn", f"turn {i} needs \"from\" in {sorted(ROLES)} and a string \"value\"")
        msgs.append({"role": ROLES[turn["from"]], "content": turn["value"]})
    if not any(m["role"] == "assistant" for m in msgs):
        raise BadSample(where, "no reply", "no assistant (gpt) turn, so nothing to learn from")
    return msgs


def _image_paths(obj: dict, where: str, images: Path | None) -> list[Path]:
    names = obj.get("image")
    if names is None:
        return []
    names = names if isinstance(names, list) else [names]
    out = []
    for name in names:
        if not isinstance(name, str) or not name:
            raise BadSample(where, "malformed image", f"\"image\" must be a file name or a list of them, got {name!r}")
        path = (images / name) if images is not None else Path(name)
        if not path.is_file():
            raise BadSample(where, "missing image", f"image {path} not found" + ("" if images is not None else
                                                                                   " (pass the image folder: --images DIR)"))
        out.append(path)
    return out


def _background(processor: Any) -> tuple[int, ...]:
    """LLaVA-1.5's padding colour: the processor's mean, in 0..255."""
    return tuple(int(round(255 * m)) for m in getattr(processor.image_processor, "image_mean", (0.5, 0.5, 0.5)))


@contextlib.contextmanager
def _opened(path: Path, where: str):
    """The image file opened with Pillow; a file Pillow cannot read (or decode, inside the block) is a
    `BadSample` naming the sample."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            yield im
    except (UnidentifiedImageError, OSError) as e:
        raise BadSample(where, "unreadable image", f"image {path} cannot be read ({e})") from None


def _open_image(path: Path, where: str, aspect: str, background: tuple[int, ...]) -> Any:
    """The image, decoded, RGB, padded to a square for `aspect="pad"`."""
    with _opened(path, where) as im:
        img = im.convert("RGB")
    return expand_to_square(img, background) if aspect == "pad" else img


def _image_size(path: Path, where: str, aspect: str) -> tuple[int, int]:
    """The size the processor will see (after padding), from the file's header: nothing is decoded."""
    with _opened(path, where) as im:
        w, h = im.size
    return (max(w, h), max(w, h)) if aspect == "pad" else (w, h)


_IMAGE_TOKENS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _tokens_per_image(processor: Any, size: tuple[int, int]) -> int:
    """How many image tokens the processor expands one image of `size` into (LLaVA-1.5: a constant; size-
    dependent processors: by size), measured once per processor and size on a blank image."""
    cache = _IMAGE_TOKENS.setdefault(processor, {})
    if size not in cache:
        from PIL import Image
        token = getattr(processor, "image_token", IMAGE)
        enc = processor(images=[Image.new("RGB", size)], text=token, return_tensors="pt")
        cache[size] = int((enc["input_ids"][0] == processor.image_token_id).sum())
    return cache[size]


def pixels(sample: VisionSample, processor: Any, aspect: str = "pad") -> torch.Tensor | None:
    """The pixel values of a sample's images (read now for a lazily encoded sample)."""
    if sample.pixel_values is not None or not sample.image_paths:
        return sample.pixel_values
    background = _background(processor)
    try:
        imgs = [_open_image(p, sample.where, aspect, background) for p in sample.image_paths]
    except BadSample as e:   # readable at load (its header), not now: the file is damaged
        raise DataError(f"{e} (found while training: its header read at load time, its pixels do not)") from None
    return processor.image_processor(images=imgs, return_tensors="pt")["pixel_values"]


def _render(processor: Any, msgs: list[dict], gen: bool = False) -> str:
    tok = processor.tokenizer
    owner = tok if getattr(tok, "chat_template", None) else processor
    if getattr(owner, "chat_template", None) is None:
        raise DataError("neither the tokenizer nor the processor has a chat template: chat data needs one")
    return owner.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


def encode_sample(obj: Any, where: str, processor: Any, images: Path | None = None, max_length: int | None = None,
                  aspect: str = "pad", lazy: bool = False) -> VisionSample:
    """One sample through the processor; raises `BadSample` naming it. `lazy`: the images' headers are read
    (missing and unreadable files are found here) and their token counts measured, but their pixels are
    left on disk until `pixels` (a training set of 665K samples does not fit in memory as pixel values)."""
    if isinstance(obj, BadSample):
        raise obj
    if isinstance(obj, dict) and "id" in obj:
        where = f"sample {obj['id']!r} ({where})"
    msgs = _messages(obj, where)
    image_token = getattr(processor, "image_token", IMAGE)
    paths = _image_paths(obj, where, images)
    n_placeholders = sum(m["content"].count(image_token) for m in msgs)
    if n_placeholders != len(paths):
        raise BadSample(where, "image count", f"{n_placeholders} {image_token} placeholder(s) for {len(paths)} image(s)")
    if any(image_token in m["content"] for m in msgs if m["role"] != "user"):
        raise BadSample(where, "image count", f"{image_token} outside a human turn")
    text = _render(processor, msgs)
    image_id = processor.image_token_id
    counts = {_tokens_per_image(processor, _image_size(p, where, aspect)) for p in paths} if lazy else set()
    if len(counts) <= 1 and lazy:      # the token ids without decoding an image
        per_image, pixel_values = (counts.pop() if counts else 0), None
        ids = torch.tensor(processor.tokenizer(text.replace(image_token, image_token * per_image),
                                               add_special_tokens=False)["input_ids"], dtype=torch.long)
    else:                             # eager (or a sample whose images expand to different counts)
        imgs = [_open_image(p, where, aspect, _background(processor)) for p in paths]
        enc = processor(images=imgs or None, text=text, return_tensors="pt")
        ids, pixel_values = enc["input_ids"][0], enc.get("pixel_values")
        per_image = int((ids == image_id).sum()) // max(len(imgs), 1)
    expand = lambda s: s.replace(image_token, image_token * per_image)

    def n_tokens(s: str) -> int:
        return len(processor.tokenizer(expand(s), add_special_tokens=False)["input_ids"])

    if n_tokens(text) != len(ids):
        raise DataError(f"{where}: the processor adds tokens around the text (special tokens?); cannot align replies")
    labels = torch.full_like(ids, -100)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start, end = n_tokens(_render(processor, msgs[:i], True)), n_tokens(_render(processor, msgs[:i + 1]))
        upto = processor.tokenizer(expand(_render(processor, msgs[:i + 1])), add_special_tokens=False)["input_ids"]
        if ids[:end].tolist() != upto or start > end:
            raise DataError(f"{where}: the chat template does not render turn {i} as a continuation of the turns "
                            f"before it, so its reply tokens cannot be located")
        labels[start:end] = ids[start:end]
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        if (ids[max_length:] == image_id).any():   # the image features would no longer match its tokens
            raise BadSample(where, "too long", f"{len(ids)} tokens: truncating to max_length={max_length} would cut "
                                               f"an image's tokens")
        ids, labels = ids[:max_length], labels[:max_length]
    return VisionSample(str(obj.get("id", where)), ids, labels, pixel_values, truncated,
                        tuple(paths) if pixel_values is None else (), where)


def load_llava(path: str | Path, processor: Any, images: str | Path | None = None, max_length: int | None = None,
               aspect: str = "pad", skip_bad: bool = False, lazy: bool = False) -> VisionData:
    """Every sample of `path`, encoded (`lazy`: images left on disk, `encode_sample`); bad ones raise (or,
    with `skip_bad`, are counted by reason)."""
    if aspect not in ("pad", "resize"):
        raise DataError(f"aspect must be 'pad' (LLaVA-1.5) or 'resize', got {aspect!r}")
    images = Path(images) if images is not None else None
    if images is not None and not images.is_dir():
        raise DataError(f"{images}: no such image folder")
    data = VisionData([])
    for where, obj in read_llava(path):
        try:
            sample = encode_sample(obj, where, processor, images, max_length, aspect, lazy)
        except BadSample as e:
            if not skip_bad:
                raise
            data.skipped[e.reason] += 1
            continue
        data.samples.append(sample)
        data.truncated += sample.truncated
    if not data.samples:
        raise DataError(f"{path}: no usable sample" + (f" ({data.summary()})" if data.skipped else ""))
    return data


def collate(samples: list[VisionSample], pad_id: int) -> dict[str, torch.Tensor]:
    """A right-padded batch: input_ids, attention_mask, labels (-100 on padding), pixel_values (the
    samples' images in order; None when no sample has one)."""
    S = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), S), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), S), -100, dtype=torch.long)
    mask = torch.zeros((len(samples), S), dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s.input_ids)
        ids[b, :n], labels[b, :n], mask[b, :n] = s.input_ids, s.labels, 1
    pix = [s.pixel_values for s in samples if s.pixel_values is not None]
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if pix:
        out["pixel_values"] = torch.cat(pix)
    return out


def pad_id(processor: Any) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its EOS, else 0 (padding is masked out)."""
    tok = processor.tokenizer
    return next((i for i in (tok.pad_token_id, tok.eos_token_id) if i is not None), 0)


def training_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A `collate` batch as the trainer feeds it (`data.batches.model_inputs`): labels [B, S] become
    next-token targets [B, S] (targets[:, t] = labels[:, t + 1], -100 last), so the loss compares every
    position's logits without a shifted copy of them."""
    out = {k: v for k, v in batch.items() if k != "labels"}
    out["targets"] = torch.cat([batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], -100)], dim=1)
    return out


class SampleBatches(BatchIterator):
    """`BatchIterator`'s seeded order and resumable position over whole samples, collated per batch (`batch`:
    samples -> the trainer's batch, images read then)."""

    def __init__(self, samples: list[VisionSample], batch_size: int, seed: int, batch: Any, max_length: int):
        self.samples, self.batch, self.seq_len = samples, batch, max_length
        self._start(len(samples), batch_size, seed)

    def take(self, index: np.ndarray) -> dict[str, torch.Tensor]:
        return self.batch([self.samples[i] for i in index])


@dataclass
class LlavaData:
    """What the trainer needs from LLaVA-format data (as `data.chat.FinetuneData` for text): the tokenizer,
    its vocabulary size, training batches and validation batches."""
    processor: Any
    train: VisionData
    valid: VisionData | None
    max_length: int
    aspect: str = "pad"

    @property
    def tokenizer(self):
        return self.processor.tokenizer.backend_tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self.processor.tokenizer)

    @property
    def n_train(self) -> int:
        """Training samples (an epoch's)."""
        return len(self.train.samples)

    def batch(self, samples: list[VisionSample]) -> dict[str, torch.Tensor]:
        """The trainer's batch of `samples`, their images read from disk where they were left there."""
        ready = [dataclasses.replace(s, pixel_values=pixels(s, self.processor, self.aspect)) for s in samples]
        return training_batch(collate(ready, pad_id(self.processor)))

    def train_batches(self, batch_size: int, seed: int = 0) -> SampleBatches:
        return SampleBatches(self.train.samples, batch_size, seed, self.batch, self.max_length)

    def valid_batches(self, batch_size: int, max_batches: int | None = None):
        """Batches in file order (images read batch by batch), up to `max_batches`."""
        if self.valid is None:
            raise DataError("no validation split (set data.valid, or data.valid_fraction > 0)")
        s = self.valid.samples
        starts = range(0, len(s), batch_size)
        return (self.batch(s[i:i + batch_size]) for i in (starts if max_batches is None else starts[:max_batches]))

    def summary(self) -> str:
        return f"train {self.train.summary()}" + (f"; valid {self.valid.summary()}" if self.valid else "")


def hold_out(data: VisionData, fraction: float) -> tuple[VisionData, VisionData]:
    """(train, valid): `fraction` of the samples (at least one; a fixed random choice) for validation, both
    in file order."""
    n = len(data.samples)
    if n < 2:
        raise DataError("one sample cannot be split into train and validation; pass data.valid")
    picked = set(np.random.default_rng(0).permutation(n)[:max(1, round(fraction * n))].tolist())
    valid = VisionData([s for i, s in enumerate(data.samples) if i in picked])
    train = VisionData([s for i, s in enumerate(data.samples) if i not in picked], data.skipped, data.truncated)
    return train, valid


def load_llava_data(train: str | Path, valid: str | Path | None, valid_fraction: float, processor: Any,
                    images: str | Path | None, max_length: int, aspect: str = "pad", skip_bad: bool = False) -> LlavaData:
    """Training (and validation: the `valid` file, else `valid_fraction` of `train`) samples for the trainer,
    encoded lazily (images read batch by batch)."""
    data = load_llava(train, processor, images, max_length, aspect, skip_bad, lazy=True)
    if valid is not None:
        held = load_llava(valid, processor, images, max_length, aspect, skip_bad, lazy=True)
    elif valid_fraction > 0:
        data, held = hold_out(data, valid_fraction)
    else:
        held = None
    return LlavaData(processor, data, held, max_length, aspect)


__all__ = ["VisionSample", "VisionData", "BadSample", "read_llava", "encode_sample", "load_llava", "collate",
           "expand_to_square", "ROLES", "training_batch", "SampleBatches", "LlavaData", "hold_out", "load_llava_data", "pixels", "pad_id"]
