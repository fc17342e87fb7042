# Two commands on a fresh machine:  `make demo`  (train -> build -> serve -> recommend)  and  `make test`.
# Every target installs what it needs first (idempotent).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch; a GPU user runs `make setup TORCH=torch` (or pre-installs a CUDA build in the venv).
TORCH ?= torch==2.13.0

.PHONY: setup demo test lint quality quality-short kv-cache retrieval-bench reliability user-cache bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[train,server,bench,dev]"
	$(PY) -m pip install -q --no-deps -e ./client  # its two dependencies come with the line above
	$(PY) -m genrec.training.datasets --fetch-ml100k
	touch $@

demo: setup
	$(VENV)/bin/genrec demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q

quality: setup
	$(PY) -m genrec.benchmarks.quality

quality-short: setup
	$(PY) -m genrec.benchmarks.quality --suite short --seeds 0 --max-minutes 15

kv-cache: setup
	$(PY) -m genrec.benchmarks.kv_cache

retrieval-bench: setup
	$(PY) -m genrec.benchmarks.retrieval

reliability: setup
	$(PY) -m genrec.benchmarks.reliability

user-cache: setup
	$(PY) -m genrec.benchmarks.user_cache

bench: setup
	$(VENV)/bin/genrec bench

clean:
	rm -rf runs model_repository/*/ .pytest_cache
