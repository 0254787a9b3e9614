#!/usr/bin/env bash
# The whole GPU measurement in one call, for an NVIDIA H100/H200 (target: under 10 minutes).
#
#   benches/gpu_suite.sh OUT_DIR
#
# Every step has a limit and the suite one deadline (BUDGET_S below), inside the 600 s a command may run.
# 1. installs specdec (wheels the GPU image lacks travel in .whl/, see docs/BENCHMARKS.md),
# 2. runs the kernel tests with the Triton interpreter OFF (kernels compiled for real, held equal
#    to their PyTorch references on CUDA tensors),
# 3. benchmarks the acceptance kernels at B=64, γ=4, V=128k against their references (pytest-benchmark;
#    the HBM floor is one read of the logits / of p and q, recorded as bytes_read),
# 4. runs `specdec bench` at the Llama-3 8B / 3.2 1B shapes (random weights; bf16 and weight-only
#    int8 / int4 at batch size 1) and on the demo pair,
# 5. runs the gRPC load test on the demo pair,
# and writes everything under OUT_DIR: a summary log plus one tarball (the device tool brings back
# at most 8 files).
set -uo pipefail
OUT=${1:?usage: benches/gpu_suite.sh OUT_DIR}
WORK=$(mktemp -d)
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_suite.log") 2>&1
cd "$(dirname "$0")/.."
echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/specdec . || exit 1
export PYTHONPATH=/tmp/specdec:$PYTHONPATH PATH=/tmp/specdec/bin:$PATH
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
unset TRITON_INTERPRET

# The device tool allows 600 s a command: the steps run in order of what matters most (the issue's
# ranking: kernels compiled and equal, acceptance-kernel bandwidth, 8B-shape decode, then the rest),
# each under its own limit and all under one deadline, so a slow step only cuts the later ones.
BUDGET_S=${GPU_SUITE_BUDGET_S:-570}
DEADLINE=$(( $(date +%s) + BUDGET_S ))
step() {
  local name=$1 limit=$2 left
  shift 2
  left=$(( DEADLINE - $(date +%s) ))
  echo; echo "== $name ($(date -u +%T), limit $limit s, $left s left in the suite)"
  if [ "$left" -lt 20 ]; then echo "-- skipped: the suite's deadline"; return; fi
  [ "$left" -lt "$limit" ] && limit=$left
  timeout "$limit" "$@"; echo "-- exit $?"
}

step "kernel and GPU-path tests, compiled" 150 python3 -m pytest -q -p no:cacheprovider -rs tests/kernels tests/gpu --junitxml="$WORK/gpu_tests.xml"
step "kernel benchmarks" 90 python3 -m pytest -q -p no:cacheprovider benches/test_bench_kernels.py \
  --benchmark-json="$WORK/kernel_bench.json" --benchmark-min-rounds=50
step "bench 8B/1B shapes" 150 python3 -m specdec.cli bench --random-weights --shape llama-3-8b \
  --batch-sizes 1,16,64 --gamma 0,4,adaptive --prompt-len 128 --new-tokens 96 --repeats 2 --out "$WORK/bench-8b"
step "bench 8B quantized weights" 90 python3 -m specdec.cli bench --random-weights --shape llama-3-8b \
  --quantize none,int8,int4 --batch-sizes 1 --gamma 0,4 --prompt-len 128 --new-tokens 64 --repeats 2 --no-hf \
  --out "$WORK/bench-8b-quant"
step "bench demo pair" 60 python3 -m specdec.cli bench --demo --batch-sizes 1,4,16,64 --gamma 0,2,4,8,adaptive \
  --prompt-len 64 --new-tokens 128 --repeats 3 --out "$WORK/bench-demo"
step "gRPC load test" 45 python3 benches/load_test.py --demo --concurrency 1,16,64 --requests 128 --max-batch-size 64 \
  --out "$WORK/load_test.json"

tar -czf "$OUT/gpu_suite_results.tar.gz" -C "$WORK" .
cp "$WORK"/bench-8b/bench.json "$OUT/bench-8b.json" 2>/dev/null
cp "$WORK"/bench-demo/bench.json "$OUT/bench-demo.json" 2>/dev/null
cp "$WORK"/bench-8b-quant/bench.json "$OUT/bench-8b-quant.json" 2>/dev/null
cp "$WORK"/kernel_bench.json "$OUT/kernel_bench.json" 2>/dev/null
echo "== done $(date -u +%FT%TZ); results in $OUT"
