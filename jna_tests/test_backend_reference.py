"""`BackendTestBase` for the reference backend.

The pure-JAX backend: every dtype, D_v != D, additional KV; the widest sweep (it runs natively on a CPU).
"""

from jna_tests.backend_test_base import BackendTestBase


class TestReference(BackendTestBase):
    backend = "reference"
