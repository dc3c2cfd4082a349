# zaizai — the two commands of the README:  make demo  ·  make test
# Works on a bare machine: creates .venv, installs the CPU build of torch 2.13.0 first (an unpinned
# torch would pull gigabytes of CUDA packages), then zaizai with its dev extras.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.zaizai-installed
TORCH  ?= torch==2.13.0
JOBS   ?= 2

.PHONY: setup test demo bench clean fonts browser llama

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# A CJK font for `zaizai attention` (Chinese on the axes): installed when missing, as root with apt-get;
# elsewhere a note, and the attention picture test skips saying why.
fonts:
	@if fc-list :lang=zh 2>/dev/null | grep -q .; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  (apt-get install -y -q fonts-noto-cjk >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q fonts-noto-cjk >/dev/null 2>&1)) || \
	  echo "note: could not install fonts-noto-cjk; attention pictures need a CJK font"; \
	else echo "note: no CJK font found; install fonts-noto-cjk (or any Chinese font) for attention pictures"; fi

# Debian's chromium + chromedriver for the chat page test (tests/test_server.py): installed when missing, as root
# with apt-get; elsewhere a note, and that test skips saying why.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  (apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	   --no-install-recommends chromium chromium-driver >/dev/null 2>&1) || \
	  echo "note: could not install chromium and chromium-driver; the browser test will skip"; \
	else echo "note: no chromium/chromedriver; install Debian's chromium and chromium-driver for the browser test"; fi

# llama.cpp's Python binding, the peer the GGUF export test runs against (tests/test_gguf.py). PyPI has it as
# source only: it compiles llama.cpp, about 4-5 minutes on 2 cores, once per .venv. Portable build (no -march=native).
# If it cannot be built here, a note, and that test skips saying why (delete $(LLAMA_STAMP) to try again).
LLAMA_STAMP := $(VENV)/.llama-tried
LLAMA       ?= llama-cpp-python==0.3.36

llama: $(LLAMA_STAMP)

$(LLAMA_STAMP): $(STAMP)
	@echo "building $(LLAMA) (compiles llama.cpp, a few minutes, once) ..."
	@CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
	  CMAKE_BUILD_PARALLEL_LEVEL=$(JOBS) $(BIN)/python -m pip install --quiet "$(LLAMA)" >$(VENV)/llama-build.log 2>&1 \
	  || echo "note: could not build $(LLAMA) (see $(VENV)/llama-build.log); the llama.cpp test will skip"
	@touch $(LLAMA_STAMP)

test: setup fonts browser llama
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(JOBS) tests

demo: setup
	$(BIN)/zaizai demo

# `make bench CORPUS=../shared/corpora/tang.txt.xz` measures on that corpus (the README's figures); default: the demo's.
bench: setup
	$(BIN)/python bench/train_speed.py $(if $(CORPUS),--corpus $(CORPUS))

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
