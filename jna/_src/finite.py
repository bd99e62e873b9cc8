"""The all-finite check that guards the fused kernels' fast path (one place for every backend).

A fused kernel sums ``P V`` over whole K/V tiles, so ``0 * v`` of a masked non-finite value
would leak into queries that never see it; the backends therefore trust their fast kernel only
when every value is finite and otherwise take a kernel that contains non-finite values. The check
is one read of ``v``; fused-mosaic and unfused choose with `lax.cond`, whose predicate XLA copies
to the host (10-20 us on a small call: issue 16's profile). fused-triton needs no check: a leak
leaves its fast output tile non-finite, and its containing launch reruns exactly those programs
(`jna.backends.triton.fused._forward_call`). With a relative positional bias, fused-mosaic's containing
branch is fused-triton if it declares ``supports_rpb``, else the reference backend; a non-finite
bias needs no check (the kernels add the bias before the mask, so it reaches only its own pairs).

Measured on an H200 (`python -m benchmarks finite-probe`,
`benchmarks/results/h200_finite_probe_2026-12-01/`): written as ``all(isfinite(v))``, as
``isfinite(max|v|)`` or as an integer max over the exponent bits, the check takes the same time
(0.06-0.19 ms alone on the large public problems' ``v``, about 2x one read at the HBM peak) and
the forward the same time within 1.2%; so it stays the plain predicate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def all_finite(x: jax.Array) -> jax.Array:
    """Whether every element of ``x`` (any shape, a float dtype) is finite: a scalar bool."""
    return jnp.all(jnp.isfinite(x))
