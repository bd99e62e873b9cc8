"""`BackendTestBase` for the fused-triton backend.

The fused Pallas Triton kernels (sm80+), in Pallas interpret mode on a CPU: a smaller sweep.
"""

from jna_tests.backend_test_base import BackendTestBase


class TestFusedTriton(BackendTestBase):
    backend = "fused-triton"
