# The two commands of the README:
#   make serve   set everything up, then start the gRPC server on the embedded default models
#   make test    set everything up, then run the whole test suite
# Both are idempotent: the first run creates .venv and installs what is missing, later runs only
# reinstall the package itself (a few seconds) so the tests always see the current source.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The dependency stamp changes whenever setup.py does, so new dependencies get installed.
DEPS_STAMP := $(VENV)/.deps-$(shell $(PYTHON) -c "import hashlib,sys;print(hashlib.sha1(open('setup.py','rb').read()).hexdigest()[:12])")
SERVE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup serve test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=64" wheel

# PyTorch first, and only if it is missing: on a machine without an NVIDIA GPU the CPU build
# (torch==2.13.0); plain `pip install torch` there would pull gigabytes of CUDA packages.
$(DEPS_STAMP): $(BIN)/python setup.py
	@$(BIN)/python -c "import torch" 2>/dev/null || { \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install torch; \
	  else $(BIN)/python -m pip install torch==2.13.0; fi; }
	$(BIN)/python -m pip install -q "grpcio-tools>=1.62"
	$(BIN)/python -m pip install -q --no-build-isolation ".[dev]"
	rm -f $(VENV)/.deps-*
	touch $@

setup: $(DEPS_STAMP)
	@rm -rf build
	@$(BIN)/python -m pip install -q --no-deps --no-build-isolation --force-reinstall . 2>&1 | grep -v "^$$" || true
	@$(BIN)/python -I -c "import specdec, specdec.kernels" || { echo "specdec failed to install"; exit 1; }

# The main job: the gRPC server on the embedded demo pair (or SERVE_ARGS="--target DIR --draft DIR").
serve: setup
	$(BIN)/specdec serve $(SERVE_ARGS)

test: setup
	# pytest (not python -m pytest) so that the installed package is tested, not the source tree.
	$(BIN)/pytest -p no:cacheprovider $(PYTEST_ARGS)
	bash scripts/cpp_test.sh

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(BIN)/specdec bench --out out/bench

clean:
	rm -rf build dist *.egg-info .pytest_cache
