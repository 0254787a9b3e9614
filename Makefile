# The two commands of the README:
#   make serve   set everything up, then start the gRPC server on the default models
#   make test    set everything up, then run the whole test suite
# Both are idempotent: the first run creates .venv and installs what that command needs
# (scripts/setup.sh says what); later runs only reinstall the package itself (a few seconds), so
# the server and the tests always run the current source.

BIN := .venv/bin
SERVE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: serve test lint bench clean

# The main job: the gRPC server on the default pair - SmolLM2-135M-Instruct and the draft distilled
# for it - or SERVE_ARGS="--demo" (the tiny embedded pair) or SERVE_ARGS="--target X --draft Y".
serve:
	@bash scripts/setup.sh serve
	$(BIN)/specdec serve $(SERVE_ARGS)

test:
	@bash scripts/setup.sh test
	# pytest (not python -m pytest) so that the installed package is tested, not the source tree.
	$(BIN)/pytest -p no:cacheprovider $(PYTEST_ARGS)
	bash scripts/cpp_test.sh

lint:
	@bash scripts/setup.sh test
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench:
	@bash scripts/setup.sh bench
	$(BIN)/specdec bench --out out/bench

clean:
	rm -rf build dist *.egg-info .pytest_cache
