"""LLaVA-format data (data/llava.py): sample by sample against token lists and images built by hand."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from competesmoe.data.llava import BadSample, collate, encode_sample, load_llava, pixels
from competesmoe.data.sources import DataError

pytestmark = pytest.mark.usefixtures("one_thread")
WORDS = "what colour is the square circle triangle red green blue how many left of yes no two one".split()
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
PATCHES = 25     # (30 / 6)² image tokens, SigLIP keeps every patch ("full")


@pytest.fixture(scope="module")
def processor():
    from competesmoe.data.tokenizer import train_bpe
    from competesmoe.model.hf import hf_tokenizer
    tok = hf_tokenizer(train_bpe([" ".join(WORDS)] * 20, 200))
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]})
    tok.chat_template = TEMPLATE
    image_processor = transformers.SiglipImageProcessorPil(size={"height": 30, "width": 30})
    return transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=6,
                                       vision_feature_select_strategy="full")


def _ids(proc, text):
    return proc.tokenizer(text, add_special_tokens=False)["input_ids"]


def _special(proc, name):
    return proc.tokenizer.convert_tokens_to_ids(name)


def _image(path, w, h, seed=0):
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return rgb


def test_sample_with_an_image_token_by_token(processor, tmp_path):
    rgb = _image(tmp_path / "a.png", 40, 20)
    obj = {"id": "s1", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat colour is the square"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "how many circle"}, {"from": "gpt", "value": "two"}]}
    s = encode_sample(obj, "x", processor, tmp_path, aspect="pad")
    user, asst, end, img = (_special(processor, t) for t in ("<|user|>", "<|assistant|>", "<|end|>", "<image>"))
    turn1 = [user] + [img] * PATCHES + _ids(processor, "\nwhat colour is the square") + [end]
    reply1 = _ids(processor, "red") + [end]
    turn2 = [user] + _ids(processor, "how many circle") + [end]
    reply2 = _ids(processor, "two") + [end]
    expected = turn1 + [asst] + reply1 + turn2 + [asst] + reply2
    assert s.input_ids.tolist() == expected
    labels = [-100] * (len(turn1) + 1) + reply1 + [-100] * (len(turn2) + 1) + reply2
    assert s.labels.tolist() == labels
    # "pad": centred on a 40x40 canvas of the processor's mean colour (0.5 -> 128), then the processor
    canvas = np.full((40, 40, 3), 128, dtype=np.uint8)
    canvas[10:30, :, :] = rgb
    ref = processor.image_processor(Image.fromarray(canvas), return_tensors="pt")["pixel_values"]
    assert torch.equal(s.pixel_values, ref)
    plain = encode_sample(obj, "x", processor, tmp_path, aspect="resize").pixel_values
    assert torch.equal(plain, processor.image_processor(Image.fromarray(rgb), return_tensors="pt")["pixel_values"])


def test_text_only_sample_and_system_turn(processor, tmp_path):
    obj = {"id": 7, "conversations": [{"from": "system", "value": "yes"}, {"from": "human", "value": "what"},
                                      {"from": "gpt", "value": "no"}]}
    s = encode_sample(obj, "x", processor)
    sys_, user, asst, end = (_special(processor, t) for t in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"))
    prompt = [sys_] + _ids(processor, "yes") + [end, user] + _ids(processor, "what") + [end, asst]
    assert s.input_ids.tolist() == prompt + _ids(processor, "no") + [end]
    assert s.labels.tolist() == [-100] * len(prompt) + _ids(processor, "no") + [end]
    assert s.pixel_values is None


def _write(path, rows, jsonl=True):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) if jsonl else json.dumps(rows))
    return path


def test_json_list_and_jsonl_read_the_same(processor, tmp_path):
    _image(tmp_path / "a.png", 30, 30)
    rows = [{"id": str(i), "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nwhat"},
                                                               {"from": "gpt", "value": WORDS[i]}]} for i in range(3)]
    a = load_llava(_write(tmp_path / "d.jsonl", rows), processor, tmp_path)
    b = load_llava(_write(tmp_path / "d.json", rows, jsonl=False), processor, tmp_path)
    assert [s.input_ids.tolist() for s in a.samples] == [s.input_ids.tolist() for s in b.samples]
    assert len(a.samples) == 3 and a.summary() == "3 samples, 0 truncated"


BAD = [
    ("malformed", "not valid JSON"),
    ({"id": "e", "conversations": []}, "no conversation"),
    ({"id": "r", "conversations": [{"from": "bot", "value": "x"}]}, "turn 0 needs \"from\""),
    ({"id": "m", "image": "missing.png", "conversations": [{"from": "human", "value": "<image>\nx"},
                                                            {"from": "gpt", "value": "y"}]}, "missing.png not found"),
    ({"id": "u", "image": "junk.png", "conversations": [{"from": "human", "value": "<image>\nx"},
                                                         {"from": "gpt", "value": "y"}]}, "cannot be read"),
    ({"id": "c", "image": "a.png", "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
     "0 <image> placeholder(s) for 1 image(s)"),
    ({"id": "d", "conversations": [{"from": "human", "value": "<image>\nx"}, {"from": "gpt", "value": "y"}]},
     "1 <image> placeholder(s) for 0 image(s)"),
    ({"id": "n", "conversations": [{"from": "human", "value": "x"}]}, "no assistant (gpt) turn"),
]


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("bad,message", BAD)
def test_bad_input_names_the_sample(processor, tmp_path, bad, message, lazy):
    _image(tmp_path / "a.png", 30, 30)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    good = {"id": "ok", "conversations": [{"from": "human", "value": "what"}, {"from": "gpt", "value": "no"}]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(good) + "\n" + (bad if isinstance(bad, str) else json.dumps(bad)) + "\n")
    with pytest.raises(DataError, match=re.escape(message)) as err:
        load_llava(path, processor, tmp_path, lazy=lazy)
    name = "line 2" if isinstance(bad, str) else f"sample {bad['id']!r}"
    assert name in str(err.value) and str(path) in str(err.value)
    data = load_llava(path, processor, tmp_path, skip_bad=True, lazy=lazy)
    assert len(data.samples) == 1 and sum(data.skipped.values()) == 1 and "1 skipped" in data.summary()


@pytest.mark.parametrize("aspect", ["pad", "resize"])
def test_lazy_encoding_equals_eager(processor, tmp_path, aspect):
    """A training set leaves its images on disk (`lazy`): the same ids and labels from the images' headers
    alone, and the same pixel values once read (`pixels`); images of several sizes, one per sample, several,
    none."""
    _image(tmp_path / "a.png", 40, 20, seed=1)
    _image(tmp_path / "b.png", 30, 50, seed=2)
    _image(tmp_path / "c.png", 30, 30, seed=3)
    rows = [{"id": "a", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nwhat colour"},
                                                            {"from": "gpt", "value": "red"}]},
            {"id": "bc", "image": ["b.png", "c.png"], "conversations": [
                {"from": "human", "value": "<image> left of <image>"}, {"from": "gpt", "value": "yes"},
                {"from": "human", "value": "how many"}, {"from": "gpt", "value": "two one"}]},
            {"id": "t", "conversations": [{"from": "human", "value": "what"}, {"from": "gpt", "value": "no"}]}]
    path = _write(tmp_path / "d.jsonl", rows)
    eager = load_llava(path, processor, tmp_path, aspect=aspect).samples
    lazy = load_llava(path, processor, tmp_path, aspect=aspect, lazy=True).samples
    assert [s.pixel_values for s in lazy] == [None] * 3
    assert [len(s.image_paths) for s in lazy] == [1, 2, 0]
    for e, l in zip(eager, lazy):
        assert torch.equal(e.input_ids, l.input_ids) and torch.equal(e.labels, l.labels)
        got = pixels(l, processor, aspect)
        assert (got is None and e.pixel_values is None) or torch.equal(got, e.pixel_values)


def test_an_image_damaged_after_its_header_is_named_when_read(processor, tmp_path):
    """The header is read at load time (missing and unreadable files are found there); a file whose pixels
    cannot be decoded stops training with the sample named."""
    _image(tmp_path / "a.png", 30, 30)
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(data[:len(data) // 2])             # the header survives
    row = {"id": "late", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nwhat"},
                                                             {"from": "gpt", "value": "red"}]}
    sample = load_llava(_write(tmp_path / "d.jsonl", [row]), processor, tmp_path, lazy=True).samples[0]
    with pytest.raises(DataError, match=r"sample 'late' .*a\.png cannot be read .*its pixels do not"):
        pixels(sample, processor)


def test_truncation_keeps_the_start_and_refuses_to_cut_an_image(processor, tmp_path):
    _image(tmp_path / "a.png", 30, 30)
    obj = {"id": "t", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nwhat colour"},
                                                          {"from": "gpt", "value": "red green blue"}]}
    full = encode_sample(obj, "x", processor, tmp_path)
    cut = encode_sample(obj, "x", processor, tmp_path, max_length=len(full.input_ids) - 2)
    assert cut.truncated and torch.equal(cut.input_ids, full.input_ids[:-2]) and torch.equal(cut.labels, full.labels[:-2])
    with pytest.raises(BadSample, match="would cut an image's tokens"):
        encode_sample(obj, "x", processor, tmp_path, max_length=10)


def test_batch_goes_through_a_llava_model_loss_on_replies_only(processor, tmp_path):
    _image(tmp_path / "a.png", 50, 30, seed=1)
    _image(tmp_path / "b.png", 30, 50, seed=2)
    rows = [{"id": "a", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nwhat colour"},
                                                            {"from": "gpt", "value": "red"}]},
            {"id": "b", "conversations": [{"from": "human", "value": "how many"}, {"from": "gpt", "value": "two one"}]},
            {"id": "c", "image": "b.png", "conversations": [{"from": "human", "value": "is the square left of <image>"},
                                                            {"from": "gpt", "value": "yes"}]}]
    data = load_llava(_write(tmp_path / "d.jsonl", rows), processor, tmp_path)
    batch = collate(data.samples, pad_id=0)
    assert batch["pixel_values"].shape == (2, 3, 30, 30)
    text = transformers.LlamaConfig(vocab_size=len(processor.tokenizer), hidden_size=32, intermediate_size=48,
                                    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    vision = transformers.SiglipVisionConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=1,
                                             num_attention_heads=4, image_size=30, patch_size=6)
    model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=processor.image_token_id,
        vision_feature_select_strategy="full", vision_feature_layer=-1)).eval()
    with torch.no_grad():
        out = model(**batch)
    logits, labels = out.logits[:, :-1].double(), batch["labels"][:, 1:]
    keep = labels != -100
    ref = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    assert int(keep.sum()) == sum(len(_ids(processor, r["conversations"][1]["value"])) + 1 for r in rows)
    assert abs(out.loss.item() - ref.item()) < 1e-5


# --- the synthetic VQA set -------------------------------------------------------------------------
def _scene_from_pixels(img, cols=3, rows=2):
    """(shape, colour, column) per occupied cell, read back from the pixels: the colour at the cell's
    centre, the shape from which corners of the shape's box are filled (square: all four; triangle: the
    bottom two only; circle: none)."""
    from competesmoe.data.vqa_synth import COLOURS
    a = np.asarray(img).astype(int)
    H, W = a.shape[:2]
    cw, ch = W / cols, H / rows
    found = []
    for c in range(cols):
        for r in range(rows):
            cx, cy = int((c + 0.5) * cw), int((r + 0.5) * ch)
            px = tuple(a[cy, cx])
            colour = next((k for k, v in COLOURS.items() if max(abs(p - q) for p, q in zip(px, v)) < 40), None)
            if colour is None:
                continue
            m = 0.15 * min(cw, ch) + 2
            x0, y0, x1, y1 = int(c * cw + m), int(r * ch + m), int((c + 1) * cw - m), int((r + 1) * ch - m)
            filled = [tuple(a[y, x]) != (255, 255, 255) for x, y in ((x0, y0), (x1, y0), (x0, y1), (x1, y1))]
            shape = "square" if all(filled) else "triangle" if filled[2] and filled[3] else "circle"
            found.append((shape, colour, c))
    return found


def test_synthetic_vqa_answers_match_the_pixels():
    from competesmoe.data.vqa_synth import NUMBERS, generate
    items = generate(60, seed=5, size=96)
    assert [s for s, _ in items] == [s for s, _ in generate(60, seed=5, size=96)]        # fixed by the seed
    assert [s for s, _ in items] != [s for s, _ in generate(60, seed=6, size=96)]
    kinds = set()
    for sample, img in items:
        scene = _scene_from_pixels(img)
        q, a = sample["conversations"][0]["value"], sample["conversations"][1]["value"]
        words = q.split()
        kinds.add(sample["kind"])
        if sample["kind"] == "colour":
            shape = words[-2]
            assert [col for s, col, _ in scene if s == shape] == [a], (q, a, scene)
        elif sample["kind"] == "count":
            shape = words[-2][:-1]
            assert NUMBERS[sum(s == shape for s, _, _ in scene)] == a, (q, a, scene)
        else:
            first, second = words[3], words[-2]
            (ca,), (cb,) = [c for s, _, c in scene if s == first], [c for s, _, c in scene if s == second]
            assert a == ("yes" if ca < cb else "no"), (q, a, scene)
    assert kinds == {"colour", "count", "relation"}


def test_vqa_accuracy_picks_the_likeliest_answer(processor, tmp_path):
    """Each candidate's score is the log-likelihood of its reply tokens: -(HF's mean label loss) x tokens."""
    from competesmoe.data.vqa_synth import ANSWERS, write_vqa
    from competesmoe.eval.vqa import score_candidates, vqa_accuracy
    write_vqa(tmp_path, n_train=3, n_valid=3, n_test=6, seed=1, size=30)
    text = transformers.LlamaConfig(vocab_size=len(processor.tokenizer), hidden_size=32, intermediate_size=48,
                                    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    vision = transformers.SiglipVisionConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=1,
                                             num_attention_heads=4, image_size=30, patch_size=6)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=processor.image_token_id,
        vision_feature_select_strategy="full", vision_feature_layer=-1)).eval()
    rows = [json.loads(l) for l in (tmp_path / "test.jsonl").read_text().splitlines()]
    right = 0
    for row in rows:
        cands = ANSWERS[row["kind"]]
        scores = score_candidates(model, processor, row, cands, tmp_path / "images")
        by_hand = []
        for c in cands:
            s = encode_sample({**row, "conversations": [row["conversations"][0], {"from": "gpt", "value": c}]}, "x",
                              processor, tmp_path / "images")
            with torch.no_grad():
                loss = model(input_ids=s.input_ids[None], pixel_values=s.pixel_values, labels=s.labels[None]).loss
            by_hand.append(-loss.item() * int((s.labels != -100).sum()))
        assert torch.allclose(scores, torch.tensor(by_hand, dtype=scores.dtype), atol=1e-4)
        right += cands[int(torch.tensor(by_hand).argmax())] == row["conversations"][1]["value"]
    acc = vqa_accuracy(model, processor, tmp_path / "test.jsonl", tmp_path / "images")
    assert acc["n"] == 6 and acc["accuracy"] == right / 6
