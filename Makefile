# Two commands do all the set-up on a fresh machine:
#   make demo   # creates .venv (Python >= 3.12), installs jna, runs the demo on this device
#   make test   # same set-up, then the test suite (CPU; Pallas kernels in interpret mode)
# More:
#   make test-full            # also the slow tier (the rest of the sweeps; every backend for the
#                             # backend-independent checks)
#   make smoke JAX=0.12.0.1   # build the wheel, install it into a fresh venv with that jax, run
#                             # the smoke tier from outside the checkout (.ci/run: both jax ends)
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_WORKERS ?= 2
JAX ?= 0.12.0.1
# The suite runs on the low end of jna's jax range (the GPU machines' jax); the smoke tier also
# checks the high end. Both ends are named here and in .ci/run only.
JAX_SUITE := 0.11.2

.PHONY: demo test test-full smoke clean

$(VENV)/.installed: pyproject.toml scripts/find_python.sh Makefile
	@python=$$(scripts/find_python.sh) && echo "using $$python" && "$$python" -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]' "jax==$(JAX_SUITE)" "jaxlib==$(JAX_SUITE)"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m jna.demo

test: $(VENV)/.installed
	JAX_PLATFORMS=cpu $(PY) -m pytest -n $(PYTEST_WORKERS) -q -m "not gpu and not slow" jna_tests

test-full: $(VENV)/.installed
	JAX_PLATFORMS=cpu $(PY) -m pytest -n $(PYTEST_WORKERS) -q -m "not gpu" jna_tests

smoke:
	scripts/smoke_wheel.sh $(JAX)

clean:
	rm -rf $(VENV)
