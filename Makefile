# Two commands on a fresh clone: `make demo` and `make test`. Both create .venv on first use and install everything.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   ?= artifacts/demo

.PHONY: demo test install clean

install: $(STAMP)

# torch==2.13.0 first: the pin keeps pip on the CPU wheel (see README for CUDA builds).
# llama-cpp-python compiles llama.cpp (5-10 min once; pip caches the wheel). GGML_NATIVE=OFF: a native build uses
# this CPU's newest instructions and crashes with "illegal instruction" on other machines.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	CMAKE_ARGS="-DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip install -q -e ".[dev,gguf,onnx]"
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q tests

# The main job on the embedded default corpus: train a small model, export it to GGUF (verified in llama.cpp, with
# an Ollama Modelfile beside it), and generate from both.
demo: $(STAMP)
	$(VENV)/bin/toolkit train -o $(DEMO) --force --steps 300 --seq-len 128
	$(VENV)/bin/toolkit info $(DEMO)
	$(VENV)/bin/toolkit generate $(DEMO) --prompt "Return the number of" -n 48 --temperature 0.8 --top-k 40 --seed 0
	$(VENV)/bin/toolkit export gguf $(DEMO) -o $(DEMO)-q4_k_m.gguf --outtype q4_k_m --force
	$(VENV)/bin/toolkit modelfile validate $(DEMO)-q4_k_m.Modelfile
	$(VENV)/bin/toolkit generate $(DEMO)-q4_k_m.gguf --prompt "Return the number of" -n 48

clean:
	rm -rf $(VENV) artifacts runs .pytest_cache
