"""`BackendTestBase` for the unfused backend.

The unfused Pallas Triton kernels (QK, softmax, AV), in interpret mode on a CPU: a smaller sweep.
"""

from jna_tests.backend_test_base import BackendTestBase


class TestUnfused(BackendTestBase):
    backend = "unfused"
