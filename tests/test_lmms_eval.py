"""lmms-eval (optional, installed on its own: `pip install 'lmms-eval>=0.7.3,<0.8' decord 'filelock<4'`) scores an upcycled LLaVA folder
through the `competesmoe_llava` model this package registers (entry point `lmms_eval.models`): a local
task (JSON data, images from Pillow, exact match) runs end to end offline, the model lmms-eval loaded is the
upcycled one (its MoE layers), and its answers are the greedy answers of that model generated here."""
from __future__ import annotations

import json

import pytest
import torch

lmms_eval = pytest.importorskip("lmms_eval", reason="lmms-eval is optional and not installed (docs/vlm.md, section 7)")
pytestmark = [pytest.mark.lmms, pytest.mark.usefixtures("one_thread")]

from test_vlm_train import WORDS, vlm_folder  # noqa: E402,F401  (the tiny LLaVA and its data)

TASK = """task: synth_colour
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""
UTILS = """from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image_path"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]
"""


def test_lmms_eval_scores_an_upcycled_llava_folder(vlm_folder, tmp_path):  # noqa: F811
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager
    from transformers import AutoModelForImageTextToText, AutoProcessor
    import competesmoe  # noqa: F401
    from competesmoe import moe_layers
    from competesmoe.cli import main
    out = tmp_path / "moe"
    assert main(["upcycle", str(vlm_folder / "dense"), str(out), "--router", "competesmoe"]) == 0
    rows = [{"question": "what colour is the square", "answer": WORDS[7 + i % 3],
             "image_path": str(vlm_folder / "images" / f"{i}.png")} for i in range(4)]
    data = tmp_path / "synth.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = tmp_path / "tasks"
    task.mkdir()
    (task / "synth_colour.yaml").write_text(TASK.format(data=data))
    (task / "utils.py").write_text(UTILS)
    res = simple_evaluate(model="competesmoe_llava", model_args=f"pretrained={out},dtype=float32",
                          tasks=["synth_colour"], batch_size=1, task_manager=TaskManager(include_path=str(task)),
                          log_samples=True, device="cpu")
    score = res["results"]["synth_colour"]
    assert 0.0 <= score["exact_match,none"] <= 1.0
    samples = res["samples"]["synth_colour"]
    assert len(samples) == 4
    # the answers are the upcycled model's greedy answers to lmms-eval's prompt ("<image>\n" + question in the
    # chat template); lmms-eval answers "" when generation raises, which this comparison catches
    from PIL import Image
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert len(moe_layers(model)) == 3
    proc = AutoProcessor.from_pretrained(out)
    eos = proc.tokenizer.eos_token_id
    for s in samples:
        doc = rows[s["doc_id"]]
        text = proc.tokenizer.apply_chat_template([{"role": "user", "content": "<image>\n" + doc["question"]}],
                                                  tokenize=False, add_generation_prompt=True)
        inputs = proc(images=[Image.open(doc["image_path"]).convert("RGB")], text=text, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=4, do_sample=False, num_beams=1, eos_token_id=eos,
                                 pad_token_id=eos)
        mine = proc.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        assert mine and s["resps"][0][0] == mine, (s["resps"], mine)
