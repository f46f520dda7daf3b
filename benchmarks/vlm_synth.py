"""PT -> PFT -> VIT on the synthetic VQA set with a tiny LLaVA (SigLIP + Llama built from configs):
SMoE vs CompeteSMoE in the VIT stage (vision encoder + connector upcycled, 4 experts, top-2), and the dense
model trained for as many VIT steps as a control. Several seeds; writes a markdown report.

    python benchmarks/vlm_synth.py --work runs/vlm-synth --report docs/results/vlm-synth.md

The stages are the library's `competesmoe vlm` presets (`finetune_preset("vlm-pt" | "vlm-pft" | "vlm-vit")`:
freezing by module group, the project's Trainer, the competition schedule) with Table 10's structure (PT:
connector only; PFT: everything; VIT: upcycled, balance 0.01, z-loss 0.001, ω 0.07, A_max 9, warm-up 5%)
but learning rates and steps sized for a randomly initialised tiny model on CPU (the paper's 2e-6 / 4e-6
move a pretrained 4 B model; they would not move this one). Each stage starts from the previous stage's
RUN/hf folder, as a user's would.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import competesmoe  # noqa: E402,F401
from competesmoe.data.vqa_synth import VOCAB, write_vqa  # noqa: E402
from competesmoe.eval.vqa import vqa_accuracy  # noqa: E402
from competesmoe.train.finetune import finetune, finetune_preset  # noqa: E402

hf_logging.set_verbosity_error()
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def processor(size: int, patch: int):
    from competesmoe.data.tokenizer import train_bpe
    from competesmoe.model.hf import hf_tokenizer
    tok = hf_tokenizer(train_bpe([" ".join(VOCAB)] * 50, 120))
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<|user|>", "<|assistant|>", "<|end|>"]})
    tok.chat_template = TEMPLATE
    return transformers.LlavaProcessor(
        image_processor=transformers.SiglipImageProcessorPil(size={"height": size, "width": size}),
        tokenizer=tok, patch_size=patch, vision_feature_select_strategy="full", chat_template=TEMPLATE)


def dense_model(proc, size: int, patch: int, width: int, seed: int):
    torch.manual_seed(seed)
    text = transformers.LlamaConfig(vocab_size=len(proc.tokenizer), hidden_size=width, intermediate_size=2 * width,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                    max_position_embeddings=128)
    vision = transformers.SiglipVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=size, patch_size=patch)
    return transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=proc.image_token_id,
        vision_feature_select_strategy="full", vision_feature_layer=-1))


def run_stage(stage: str, init: Path, data: Path, out: Path, sets: dict) -> dict:
    """One stage from the model folder `init`; returns its numbers and test accuracy (model in OUT/hf)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    cfg = finetune_preset(stage, {"model.init": str(init), "data.train": str(data / "train.jsonl"),
                                  "data.valid": str(data / "valid.jsonl"), "images": str(data / "images"),
                                  "train.out_dir": str(out), "epochs": 0.0, "data.seq_len": 128,
                                  "train.precision": "fp32", "train.grad_accum": 1, "train.eval_every": 10 ** 9,
                                  "train.ckpt_every": 10 ** 9, "train.keep_last": 1, "train.tensorboard": False,
                                  "train.log_every": 50, **sets})
    tic = time.perf_counter()
    summary = finetune(cfg, log=lambda *_: None)
    seconds = time.perf_counter() - tic
    model = AutoModelForImageTextToText.from_pretrained(out / "hf")
    test = vqa_accuracy(model, AutoProcessor.from_pretrained(out / "hf"), data / "test.jsonl", data / "images")
    return {"seconds": seconds, "val_loss": summary["val_loss"], "test": test}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="runs/vlm-synth")
    p.add_argument("--report", default=None, help="markdown report (and a .json next to it)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--test", type=int, default=300)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--pt-steps", type=int, default=100)
    p.add_argument("--pft-steps", type=int, default=500)
    p.add_argument("--vit-steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=2e-3, help="PFT learning rate (PT: 1e-3 as Table 10)")
    p.add_argument("--vit-lr", type=float, default=1e-3)
    args = p.parse_args()
    work = Path(args.work)
    data = work / "data"
    if not (data / "test.jsonl").is_file():
        write_vqa(data, n_train=args.train, n_valid=100, n_test=args.test, seed=0, size=args.size)
    proc = processor(args.size, args.patch)
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        row, run = {"seed": seed}, work / f"s{seed}"
        init = run / "init"
        dense_model(proc, args.size, args.patch, args.width, seed).save_pretrained(init)
        proc.save_pretrained(init)
        common = {"train.batch_size": args.batch, "train.seed": seed, "data.seed": seed}
        row["pt"] = run_stage("vlm-pt", init, data, run / "pt", {**common, "train.steps": args.pt_steps})
        row["pft"] = run_stage("vlm-pft", run / "pt" / "hf", data, run / "pft",
                               {**common, "train.steps": args.pft_steps, "train.lr": args.lr})
        print(f"seed {seed}: PT {row['pt']['seconds']:.0f} s, PFT {row['pft']['seconds']:.0f} s, "
              f"test accuracy {row['pft']['test']['accuracy']:.3f}", flush=True)
        for arm in ("dense", "smoe", "competesmoe"):
            sets = {**common, "train.steps": args.vit_steps, "train.lr": args.vit_lr, "model.upcycle": arm != "dense",
                    **({} if arm == "dense" else {"model.router": arm})}
            row[arm] = run_stage("vlm-vit", run / "pft" / "hf", data, run / arm, sets)
            print(f"seed {seed} {arm}: test accuracy {row[arm]['test']['accuracy']:.3f}, validation loss "
                  f"{row[arm]['val_loss']:.4f} ({row[arm]['seconds']:.0f} s)", flush=True)
        results.append(row)
    report = render(results, args)
    print(report)
    if args.report:
        Path(args.report).write_text(report)
        Path(args.report).with_suffix(".json").write_text(json.dumps({"args": vars(args), "runs": results}, indent=1))
    return 0


def _ms(xs):
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def render(results, args) -> str:
    kinds = sorted(results[0]["pft"]["test"]["per_kind"])
    lines = ["| arm | test accuracy | " + " | ".join(kinds) + " | validation loss | VIT seconds |",
             "|---" * (4 + len(kinds)) + "|"]
    arms = [("after PFT (dense)", "pft"), ("VIT dense (control)", "dense"), ("VIT SMoE", "smoe"),
            ("VIT CompeteSMoE", "competesmoe")]
    for label, key in arms:
        acc = [r[key]["test"]["accuracy"] for r in results]
        per = [_ms([r[key]["test"]["per_kind"][k] for r in results]) for k in kinds]
        secs = "" if key == "pft" else f"{statistics.mean(r[key]['seconds'] for r in results):.0f}"
        val = _ms([r[key]["val_loss"] for r in results])
        lines.append(f"| {label} | {_ms(acc)} | " + " | ".join(per) + f" | {val} | {secs} |")
    return "\n".join(lines) + f"\n\n{len(results)} seeds ({args.seeds}); mean ± std over seeds; test set of {args.test}.\n"


if __name__ == "__main__":
    raise SystemExit(main())
