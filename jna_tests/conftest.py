"""Pytest setup: report which platform and jna backends this run covers.

JAX_PLATFORMS is deliberately not forced here: CI sets JAX_PLATFORMS=cpu, the GPU machine runs
the same suite on its GPU. Narrow the backends with JNA_TEST_BACKENDS=name1,name2.
"""

import jax

from jna_tests.backends import active_backends


def pytest_report_header(config):
    return f"jax {jax.__version__} on {jax.default_backend()}; jna backends: {active_backends()}"
