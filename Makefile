# zaizai — the two commands of the README:  make demo  ·  make test
# Works on a bare machine: creates .venv, installs the CPU build of torch 2.13.0 first (an unpinned
# torch would pull gigabytes of CUDA packages), then zaizai with its dev extras.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.zaizai-installed
TORCH  ?= torch==2.13.0
JOBS   ?= 2

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(JOBS) tests

demo: setup
	$(BIN)/zaizai demo

bench: setup
	$(BIN)/python bench/train_speed.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
