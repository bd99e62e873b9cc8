# Two commands do all the set-up on a fresh machine:
#   make demo   # creates .venv (Python >= 3.12), installs jna, runs the demo on this device
#   make test   # same set-up, then the test suite (CPU; Pallas kernels in interpret mode)
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_WORKERS ?= 2

.PHONY: demo test clean

$(VENV)/.installed: pyproject.toml scripts/find_python.sh
	@python=$$(scripts/find_python.sh) && echo "using $$python" && "$$python" -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m jna.demo

test: $(VENV)/.installed
	JAX_PLATFORMS=cpu $(PY) -m pytest -n $(PYTEST_WORKERS) -q -m "not gpu" jna_tests

clean:
	rm -rf $(VENV)
