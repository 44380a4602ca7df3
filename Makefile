# Two commands on a fresh clone: `make demo` and `make test`. Both create .venv on first use and install everything.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean

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

test: $(STAMP)
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
