#!/usr/bin/env bash
# Dense tiny model on Gutenberg -> upcycle -> fine-tune as SMoE and as CompeteSMoE (same budget, 3 seeds),
# then validation perplexity + BLiMP (`competesmoe eval`) and the routing views (`competesmoe analyze`).
# Results: docs/results/upcycle-tiny-gutenberg.md. Run from the repository root with OMP_NUM_THREADS=1
# (about 45 min on 2 CPU cores shared with other jobs).
set -euo pipefail
CS=${CS:-.venv/bin/competesmoe}
GB=../shared/data/corpus/gutenberg
OUT=${OUT:-runs/upcycle}
DENSE_STEPS=${DENSE_STEPS:-400}
FT_STEPS=${FT_STEPS:-200}
mkdir -p "$OUT"

# 1. the dense model: tiny preset with one FFN of the active width (K·d_expert = 256) per block
[ -d "$OUT/dense/checkpoints" ] || $CS train --preset tiny --set model.dense=true \
  --data $GB/train.jsonl.gz --valid $GB/valid.jsonl.gz --steps "$DENSE_STEPS" --set data.max_train_chars=30000000 \
  --set train.eval_every=100 --set train.ckpt_every=100 --set train.eval_batches=10 --set data.progress=false \
  --set train.tensorboard=false --out "$OUT/dense"

# 2. upcycled folders, for the record (finetune below upcycles the dense run itself, identically)
for r in smoe competesmoe; do
  [ -d "$OUT/upcycled-$r" ] || $CS upcycle "$OUT/dense" "$OUT/upcycled-$r" --experts 4 --top-k 2 --router $r
done

# 3. fine-tune: vit preset (4 experts, K 2, switch 0.01 + z 0.001, ω 0.07, A_max 9, warm-up 5%) at a
#    CPU-sized batch and a tiny-model learning rate; seed s = router init, data order and trainer seed.
#    "dense": the dense model trained as long, not upcycled (model.upcycle=false; the recorded results ran
#    this arm as --router smoe --experts 1 --top-k 1, refused since 2026-12-05: one expert is the dense MLP).
for s in 1 2 3; do
  for r in smoe competesmoe dense; do
    run="$OUT/ft-$r-s$s"
    arm="--router $r"
    [ "$r" = dense ] && arm="--set model.upcycle=false"
    [ -f "$run/summary.json" ] || $CS finetune "$OUT/dense" $arm --data $GB/train.jsonl.gz \
      --valid $GB/valid.jsonl.gz --out "$run" --steps "$FT_STEPS" --precision fp32 \
      --set data.seq_len=128 --set train.batch_size=16 --set train.grad_accum=1 --set train.lr=1e-3 \
      --set train.min_lr_ratio=0.1 --set train.warmup_steps=10 --set data.max_train_chars=30000000 \
      --set train.eval_every=50 --set train.ckpt_every=50 --set train.eval_batches=10 --set data.progress=false \
      --set train.tensorboard=false --set model.seed=$s --set data.seed=$s --set train.seed=$s
  done
done

# 4. validation perplexity and BLiMP (first 100 pairs of each of the 67 paradigms)
$CS eval "$OUT/dense" "$OUT"/ft-smoe-s{1,2,3} "$OUT"/ft-competesmoe-s{1,2,3} "$OUT"/ft-dense-s{1,2,3} \
  --tasks valid_ppl,blimp --limit 100 --batch-size 32 --no-progress --out "$OUT/eval"

# 5. routing views: ECR between consecutive checkpoints, router-competition agreement, entropies
for s in 1 2 3; do
  for r in smoe competesmoe; do
    $CS analyze "$OUT/ft-$r-s$s" --tokens 2048 --no-shift --out "$OUT/ft-$r-s$s/analysis"
    .venv/bin/python benchmarks/upcycle_symmetry.py "$OUT/dense" "$OUT/ft-$r-s$s" > "$OUT/ft-$r-s$s/symmetry.md"
  done
done
