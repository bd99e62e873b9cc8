"""The backends under test and what each supports; the one place to add a backend.

A backend's own tests (the oracle sweep, NaN isolation, memory) are `BackendTestBase`
(`jna_tests/backend_test_base.py`), subclassed once per backend in
``jna_tests/test_backend_<name>.py``; the backend-independent tests (jit/vmap/grad, modules,
window semantics) take the backends as params (`tiered`: the reference in ``make test``, the
others in ``make test-full``). To put a new backend through the whole suite, add one
`Capabilities` entry to `BACKENDS` and its ``test_backend_<name>.py`` subclass (and drop its name
from `NOT_YET_BUILT`; `test_api.test_every_built_backend_is_under_test` checks both).
Interpret-mode Pallas backends are slow on CPU: give them smaller `cases` counts and `max_tokens`.

`JNA_TEST_BACKENDS=name1,name2` restricts the run to some backends (e.g. on the GPU machine).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import pytest
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a backend supports, and how much of the random sweep to spend on it.

    Attributes:
      dtypes: input dtypes it accepts (float32 is checked at 1e-4/1e-3, others by relative L2).
      grads: whether it has a backward pass (gradient checks are generated only if True).
      additional_kv: whether it accepts additional_keys/values.
      head_dims: head dims (D and D_v) the sweep may draw; any value must work.
      max_tokens: upper bound on N = prod(spatial shape) per sweep case.
      cases: sweep cases per rank (1-D, 2-D, 3-D) for float32 forward+backward.
      lowp_cases: sweep cases per rank for each non-float32 dtype.
      platforms: jax platforms ("cpu", "gpu") the backend runs on (interpret mode counts).
      interpreted_on_cpu: a Pallas backend that only interprets on CPU; large-problem tests
        (e.g. the 65k-token memory check) leave it out there.
      lowp_rtol: relative L2 bound for bf16/fp16 outputs and gradients (the suite's tolerance for half types).
      same_value_dim: the backend needs D_v == D (the sweep draws equal dims; edge cases are
        run at ``head_dims[0]``).
    """

    dtypes: tuple = (jnp.float32, jnp.bfloat16, jnp.float16)
    grads: bool = True
    additional_kv: bool = True
    head_dims: tuple = (4, 8, 12, 16, 32)
    max_tokens: int = 1000
    cases: tuple = (14, 10, 8)
    lowp_cases: tuple = (2, 2, 2)
    platforms: tuple = ("cpu", "gpu")
    lowp_rtol: float = 1e-2
    interpreted_on_cpu: bool = False
    same_value_dim: bool = False


BACKENDS: dict[str, Capabilities] = {
    "reference": Capabilities(),
    "fused-triton": Capabilities(max_tokens=400, cases=(8, 6, 5), lowp_cases=(1, 1, 1),
                                 interpreted_on_cpu=True),
    "unfused": Capabilities(max_tokens=300, cases=(5, 4, 3), lowp_cases=(1, 1, 1),
                            interpreted_on_cpu=True),
    # Hopper only (the CPU suite runs its kernels in the Mosaic GPU simulator instead:
    # jna_tests/test_fused_mosaic_sim.py).
    "fused-mosaic": Capabilities(dtypes=(jnp.bfloat16, jnp.float16), head_dims=(32, 64, 128, 256),
                                 same_value_dim=True, lowp_cases=(3, 3, 2), platforms=("gpu",)),
}

# Names the library knows but has not built yet: asking for them is a NotImplementedError.
NOT_YET_BUILT: tuple[str, ...] = ()


def _platform() -> str:
    platform = jax.default_backend()
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def active_backends() -> list[str]:
    """Backends to test on this platform, optionally narrowed by ``JNA_TEST_BACKENDS``."""
    platform = _platform()
    wanted = os.environ.get("JNA_TEST_BACKENDS")
    names = [n for n, caps in BACKENDS.items() if platform in caps.platforms]
    if wanted:
        names = [n for n in names if n in wanted.split(",")]
    return names


def native_backends() -> list[str]:
    """Active backends that run natively here (not Pallas interpret mode on a CPU)."""
    cpu = _platform() == "cpu"
    return [n for n in active_backends() if not (cpu and BACKENDS[n].interpreted_on_cpu)]


def float32_backends() -> list[str]:
    """Active backends that take float32 inputs (the API, semantics and module tests use float32
    with small head dims; fused-mosaic, bf16/fp16 only, is covered by the sweep, the GPU tests
    and its simulator tests)."""
    return [n for n in active_backends() if jnp.float32 in BACKENDS[n].dtypes]



def tiered(backends, fast=("reference",)) -> list:
    """Backends as pytest params of a test whose subject is not the backend (jit/vmap/grad,
    modules, window semantics): the ``fast`` ones run in ``make test``, the others are marked
    ``slow`` and run in ``make test-full`` (every backend's own behaviour is covered in the fast
    tier by the oracle sweep, the bad-input and the non-finite checks)."""
    return [pytest.param(b, id=b, marks=() if b in fast else pytest.mark.slow) for b in backends]
