#!/usr/bin/env bash
# The recipe of specdec/assets/smollm2_draft (docs/DEMO_MODELS.md): the data, then the distillation.
# Run with specdec installed (make test sets up .venv): PATH=.venv/bin:$PATH bash scripts/build_smollm2_draft.sh OUT
set -euo pipefail
OUT=${1:-out/smollm2-draft}
mkdir -p "$OUT"
specdec distill-data --out "$OUT/train.jsonl" --count 320 --max-new-tokens 128
specdec distill-data --out "$OUT/train2.jsonl" --start 320 --count 576 --max-new-tokens 128
specdec distill-data --out "$OUT/heldout.jsonl" --count 48 --heldout --max-new-tokens 128
TARGET=$(python -c 'from specdec.assets import default_target; print(default_target())')
specdec distill --target "$TARGET" --out "$OUT/draft" \
    --data "$OUT/train.jsonl" "$OUT/train2.jsonl" --heldout-data "$OUT/heldout.jsonl" \
    --layers 1 --head-tokens 8192 --share-embeddings --teacher-top-k 64 --save-dtype bfloat16 \
    --steps 640 --batch-size 8 --seq-len 256 --lr 2e-3 --warmup 40 --eval-every 160 --seed 0
