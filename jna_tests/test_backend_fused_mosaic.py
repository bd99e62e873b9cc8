"""`BackendTestBase` for the fused-mosaic backend.

The fused Mosaic GPU kernels (Hopper). Collected on a GPU only: on a CPU its kernels run in the
Mosaic GPU simulator instead (`test_fused_mosaic_sim.py`).
"""

from jna_tests.backend_test_base import BackendTestBase


class TestFusedMosaic(BackendTestBase):
    backend = "fused-mosaic"
