# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast native bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch==2.13.0 is the CPU build on this machine's disk; a bare `torch` would fetch a CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	# native: cmake, ninja and the nlohmann-json headers from PyPI, for kernels/ (OpenSSL's libcrypto comes
	# from the system: Debian's libssl-dev).
	$(PY) -m pip install -q -e ".[test,onnx,bench,quality,native,serve,int8]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m deepcache_compile demo

# The C++ runtime (kernels/) against the venv's libtorch: build/ and deepcache_compile/_native/.
native: $(STAMP)
	$(VENV)/bin/cmake -S . -B build -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV)/bin/ninja) \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
	  -DNLOHMANN_JSON_INCLUDE_DIR="$$($(PY) -c 'import nlohmann_json, os; print(os.path.join(os.path.dirname(nlohmann_json.__file__), "include"))')"
	$(VENV)/bin/cmake --build build -j 2

test: native
	# Two workers, one file each (module fixtures stay shared); tests/conftest.py gives each worker one thread.
	# The C++ unit tests (ctest) run inside the suite (tests/test_native.py).
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests

# Everyday lane: no compiler backend, no C++ build, no SD 1.5-size model (tests marked slow in tests/conftest.py).
test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow" tests

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache build deepcache_compile/_native
