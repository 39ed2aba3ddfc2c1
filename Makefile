# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch==2.13.0 is the CPU build on this machine's disk; a bare `torch` would fetch a CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,onnx,bench,quality]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m deepcache_compile demo

test: $(STAMP)
	# Two workers, one file each (module fixtures stay shared); tests/conftest.py gives each worker one thread.
	$(PY) -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
