"""Pytest setup: report which platform and jna backends this run covers.

JAX_PLATFORMS is deliberately not forced here: CI sets JAX_PLATFORMS=cpu, the GPU machine runs
the same suite on its GPU. Narrow the backends with JNA_TEST_BACKENDS=name1,name2.
"""

import jax

from jna_tests.backends import active_backends


def pytest_report_header(config):
    return f"jax {jax.__version__} on {jax.default_backend()}; jna backends: {active_backends()}"


def pytest_configure(config):
    # Here rather than in pyproject.toml: the smoke tier runs a copy of this suite outside the
    # checkout, where only this file configures pytest.
    config.addinivalue_line("markers", "gpu: needs a GPU (large shapes, real kernel lowering); deselected on CPU")
    config.addinivalue_line("markers", "slow: the rest of the exhaustive sweeps and backend-independent "
                            "checks on every backend (make test-full)")


def pytest_generate_tests(metafunc):
    # Per-backend parametrization of `BackendTestBase` subclasses (their sweep cases).
    generate = getattr(metafunc.cls, "generate", None)
    if generate is not None:
        generate(metafunc)
