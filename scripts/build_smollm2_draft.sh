#!/usr/bin/env bash
# The recipe of specdec/assets/smollm2_draft (docs/DEMO_MODELS.md): the data, then the distillation.
# Run with specdec installed (make test sets up .venv): PATH=.venv/bin:$PATH bash scripts/build_smollm2_draft.sh OUT
# The shipped draft reads the target's features (EAGLE-style; docs/DEMO_MODELS.md); FEATURE_INPUT=0
# trains the plain draft it replaced (the same recipe without --feature-input).
set -euo pipefail
OUT=${1:-out/smollm2-draft}
mkdir -p "$OUT"
specdec distill-data --out "$OUT/train.jsonl" --count 896 --max-new-tokens 128 --max-batch-size 64
specdec distill-data --out "$OUT/heldout.jsonl" --count 48 --heldout --max-new-tokens 128
TARGET=$(python -c 'from specdec.assets import default_target; print(default_target())')
EXTRA=()
if [[ "${FEATURE_INPUT:-1}" == 1 ]]; then EXTRA=(--feature-input --feature-unroll 2); fi
specdec distill --target "$TARGET" --out "$OUT/draft" \
    --data "$OUT/train.jsonl" --heldout-data "$OUT/heldout.jsonl" \
    --layers 1 --head-tokens 8192 --share-embeddings --teacher-top-k 64 --save-dtype bfloat16 \
    --steps 640 --batch-size 8 --seq-len 256 --lr 2e-3 --warmup 40 --eval-every 160 --seed 0 "${EXTRA[@]}"
