"""What the two Pallas Triton backends (`fused`, `unfused`) share: where they run, the head dims
they take, and the float32 constants their kernels use."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from jna._src.arguments import NAProblem
from jna.backends import device
from jna.backends.base import Backend

MAX_HEAD_DIM = 256
F32_MAX = float(np.finfo(np.float32).max)
# float32 constants where both operands of an op are constants: Python floats would make
# the result float64 under jax_enable_x64 (and the carries/cond branches mismatch).
ZERO, ONE = np.float32(0), np.float32(1)


def interpret() -> bool:
    """Pallas interpret mode: on a CPU-only machine (tests)."""
    return device.emulated()


def is_available() -> tuple[bool, str]:
    return device.gpu_availability(8.0, float("inf"), "an NVIDIA GPU of compute capability >= 8.0",
                                   "interpret mode on CPU")


def runs_natively() -> bool:
    """True on a GPU where the kernels compile (``auto`` only picks native backends)."""
    return is_available()[0] and not interpret()


def unsupported_reason(problem: NAProblem) -> str | None:
    for name, dim in (("head_dim", problem.head_dim), ("value_dim", problem.value_dim)):
        if dim > MAX_HEAD_DIM:
            return f"{name} {dim} > {MAX_HEAD_DIM}"
    return None


MIN_TILE_TOKENS = 16  # Triton's dot needs 16 rows/columns (smaller tiles ran wrong on an H200)


@dataclasses.dataclass(frozen=True)
class TritonBackend(Backend):
    """Where a Pallas Triton backend runs and what it takes (the rest is the subclass's)."""

    min_tile_tokens: ClassVar[int] = MIN_TILE_TOKENS

    def is_available(self) -> tuple[bool, str]:
        return is_available()

    def runs_natively(self) -> bool:
        return runs_natively()

    def supports(self, problem: NAProblem) -> str | None:
        return unsupported_reason(problem)
