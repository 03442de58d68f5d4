# The two Quickstart commands: `make demo` and `make test`. Both create .venv on first use,
# install torch (the CPU wheel when no NVIDIA GPU is visible), build driftscope._C and install the
# package in editable mode. Override PYTHON=... or TORCH_SPEC=... when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_GPU),1)
TORCH_SPEC ?= torch
else
TORCH_SPEC ?= torch==2.13.0
endif
PYTEST_ARGS ?=

.PHONY: demo test bench build clean

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q "scikit-build-core>=0.10" "pybind11>=2.12"
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml CMakeLists.txt $(wildcard csrc/*)
	$(PIP) install -q --no-build-isolation -e ".[test,bench,report,eval,gguf]"
	touch $@

build: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/driftscope demo

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(PY) -m pytest bench --benchmark-only $(PYTEST_ARGS)

clean:
	rm -rf build $(VENV) driftscope/_C*.so
