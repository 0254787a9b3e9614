#!/usr/bin/env bash
# The eval reports of docs/ROUTING.md ("Evaluating tiers"). A second specdec on loopback serves
# SmolLM2-135M alone as the endpoint tier of docs/examples/routes-smollm2.yaml and
# routes-code-eval.yaml; `specdec eval` runs each named set through its route's tiers.
#   bash scripts/eval_reports.sh [OUT [SET ...]]   SET: tickets extraction code (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/eval}
shift || true
SETS=${*:-tickets extraction code}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
"$PY" -m specdec.cli serve --target "$("$PY" -c 'from specdec.assets import default_target; print(default_target())')" \
    --port 50101 --http-port 8101 --metrics-port 9101 --served-model-name frontier >"$OUT/frontier.log" 2>&1 &
frontier=$!
trap 'kill $frontier 2>/dev/null; wait $frontier 2>/dev/null || true' EXIT
for _ in $(seq 300); do curl -sf localhost:8101/health >/dev/null 2>&1 && break; sleep 1; done
curl -sf localhost:8101/health >/dev/null || { echo "eval_reports: the endpoint never came up ($OUT/frontier.log)" >&2; exit 1; }
PRICES=(--price frontier=0.15,0.6 --price speculative=hour:0.1)
for set in $SETS; do
  case "$set" in
    tickets)
      "$PY" -m specdec.cli eval --data evals/support_tickets.jsonl --routes docs/examples/routes-smollm2.yaml \
          --route assistant --out "$OUT/tickets" --max-new-tokens 24 "${PRICES[@]}" \
          --prompt-variant evals/variants/careful.txt --prompt-variant evals/variants/one-word.txt ;;
    extraction)
      "$PY" -m specdec.cli eval --data evals/extraction.jsonl --routes docs/examples/routes-smollm2.yaml \
          --route assistant --out "$OUT/extraction" --max-new-tokens 48 "${PRICES[@]}" \
          --prompt-variant evals/variants/json-example.txt ;;
    code)
      "$PY" scripts/make_code_eval.py "$OUT/stdlib_next_line.jsonl"
      "$PY" -m specdec.cli eval --demo --data "$OUT/stdlib_next_line.jsonl" --routes docs/examples/routes-code-eval.yaml \
          --route code --out "$OUT/code" --max-new-tokens 24 --price smollm2=0.15,0.6 ;;
    *) echo "eval_reports: unknown set $set (tickets, extraction, code)" >&2; exit 2 ;;
  esac
done
