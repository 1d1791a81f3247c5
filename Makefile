# The two commands a new user runs: `make demo` and `make test`. Both create .venv and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# MLX (the `--to mlx` runtime) has CPU wheels on Linux; elsewhere install it by hand (`pip install -e ".[mlx]"`).
comma := ,
MLX_EXTRA := $(if $(filter Linux,$(shell uname -s)),$(comma)mlx,)

.PHONY: install demo test test-fast lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned first so pip takes the CPU build (a bare `torch` requirement would pull a multi-GB CUDA build).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "torch==2.13.0"
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/pip install -q -e ".[runtime,dev$(MLX_EXTRA)]"
	$(BIN)/python -c "import sentencepiece, llama_cpp, onnxruntime, gguf, onnx, compressed_tensors; print('install ok')"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m l4q_export.demo --work demo_out

test: install
	$(BIN)/python -m pytest -q tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: install
	$(BIN)/ruff check l4q_export tests tools

clean:
	rm -rf demo_out .pytest_cache
