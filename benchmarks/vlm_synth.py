"""PT -> PFT -> VIT on the synthetic VQA set with a tiny LLaVA (SigLIP + Llama built from configs):
SMoE vs CompeteSMoE in the VIT stage (vision encoder + connector upcycled, 4 experts, top-2), and the dense
model trained for as many VIT steps as a control. Several seeds; writes a markdown report.

    python benchmarks/vlm_synth.py --work runs/vlm-synth --report docs/results/vlm-synth.md

The stages are the library's (`train.vlm`: freezing by module group, transformers' Trainer, the competition
callback) with Table 10's structure (PT: connector only; PFT: everything; VIT: upcycled, balance 0.01,
z-loss 0.001, ω 0.07, A_max 9, warm-up 5%) but learning rates and steps sized for a randomly initialised
tiny model on CPU (the paper's 2e-6 / 4e-6 move a pretrained 4 B model; they would not move this one).
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
from competesmoe.data.llava import load_llava  # noqa: E402
from competesmoe.data.vqa_synth import VOCAB, write_vqa  # noqa: E402
from competesmoe.eval.vqa import vqa_accuracy  # noqa: E402
from competesmoe.train.vlm import make_trainer, prepare, vlm_preset  # noqa: E402

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


def run_stage(name, model, proc, samples, work, overrides):
    stage = vlm_preset(name, {"precision": "fp32", "save_steps": 10 ** 9, "logging_steps": 50, **overrides})
    model = prepare(stage, model, log=lambda *_: None)
    trainer = make_trainer(stage, model, proc, samples, work)
    tic = time.perf_counter()
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return model, {"seconds": time.perf_counter() - tic, "last_loss": losses[-1] if losses else None}


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
    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = Path(args.work)
    data = work / "data"
    if not (data / "test.jsonl").is_file():
        write_vqa(data, n_train=args.train, n_valid=100, n_test=args.test, seed=0, size=args.size)
    proc = processor(args.size, args.patch)
    train = load_llava(data / "train.jsonl", proc, data / "images").samples
    common = {"batch_size": args.batch, "grad_accum": 1}
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        row = {"seed": seed}
        model = dense_model(proc, args.size, args.patch, args.width, seed)
        model, row["pt"] = run_stage("vlm-pt", model, proc, train, work / f"s{seed}-pt",
                                     {**common, "steps": args.pt_steps, "seed": seed})
        model, row["pft"] = run_stage("vlm-pft", model, proc, train, work / f"s{seed}-pft",
                                      {**common, "steps": args.pft_steps, "lr": args.lr, "seed": seed})
        row["pft"]["test"] = vqa_accuracy(model, proc, data / "test.jsonl", data / "images")
        print(f"seed {seed}: PT {row['pt']['seconds']:.0f} s (loss {row['pt']['last_loss']}), PFT {row['pft']['seconds']:.0f} s "
              f"(loss {row['pft']['last_loss']}), test accuracy {row['pft']['test']['accuracy']:.3f}", flush=True)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for arm in ("dense", "smoe", "competesmoe"):
            m = dense_model(proc, args.size, args.patch, args.width, seed)
            m.load_state_dict(state)
            over = {**common, "steps": args.vit_steps, "lr": args.vit_lr, "seed": seed, "upcycle": arm != "dense",
                    **({} if arm == "dense" else {"model.router": arm})}
            m, row[arm] = run_stage("vlm-vit", m, proc, train, work / f"s{seed}-{arm}", over)
            row[arm]["test"] = vqa_accuracy(m, proc, data / "test.jsonl", data / "images")
            print(f"seed {seed} {arm}: test accuracy {row[arm]['test']['accuracy']:.3f} "
                  f"({row[arm]['seconds']:.0f} s)", flush=True)
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
    lines = ["| arm | test accuracy | " + " | ".join(kinds) + " | VIT seconds |", "|---" * (3 + len(kinds)) + "|"]
    arms = [("after PFT (dense)", "pft"), ("VIT dense (control)", "dense"), ("VIT SMoE", "smoe"),
            ("VIT CompeteSMoE", "competesmoe")]
    for label, key in arms:
        acc = [r[key]["test"]["accuracy"] for r in results]
        per = [_ms([r[key]["test"]["per_kind"][k] for r in results]) for k in kinds]
        secs = "" if key == "pft" else f"{statistics.mean(r[key]['seconds'] for r in results):.0f}"
        lines.append(f"| {label} | {_ms(acc)} | " + " | ".join(per) + f" | {secs} |")
    return "\n".join(lines) + f"\n\n{len(results)} seeds ({args.seeds}); mean ± std over seeds; test set of {args.test}.\n"


if __name__ == "__main__":
    raise SystemExit(main())
