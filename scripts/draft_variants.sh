#!/usr/bin/env bash
# The shared-layers experiment of docs/DEMO_MODELS.md: the shipped draft's recipe at 320 steps, alone
# (--shared-layers 0) and on the target's first 4 layers (--shared-layers 4), then the greedy
# acceptance of each (and of the shipped draft) on the held-out chat prompts.
# Needs the data of scripts/build_smollm2_draft.sh in $DATA (its train*.jsonl and heldout.jsonl).
# Run with specdec installed: PATH=.venv/bin:$PATH bash scripts/draft_variants.sh OUT [DATA]
set -euo pipefail
OUT=${1:-out/variants}
DATA=${2:-out/smollm2-draft}
TARGET=$(python -c 'from specdec.assets import default_target; print(default_target())')
for K in 0 4; do
  specdec distill --target "$TARGET" --out "$OUT/k$K" --data "$DATA"/train*.jsonl --heldout-data "$DATA/heldout.jsonl" \
    --layers 1 --shared-layers $K --head-tokens 8192 --share-embeddings --teacher-top-k 64 --save-dtype bfloat16 \
    --steps 320 --batch-size 8 --seq-len 256 --lr 2e-3 --warmup 20 --eval-every 320 --seed 0
  cp specdec/assets/smollm2_draft/heldout_prompts.json "$OUT/k$K/"
done
for DRAFT in specdec/assets/smollm2_draft "$OUT/k0" "$OUT/k4"; do
  specdec bench --target "$TARGET" --draft "$DRAFT" --batch-sizes 16 --gamma 0,1,2 --new-tokens 64 --repeats 1 \
    --no-hf --no-llama-cpp --dtype float32 --out "$OUT/bench-$(basename "$DRAFT")"
done
