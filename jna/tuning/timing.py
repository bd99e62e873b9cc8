"""Wall-clock timing of jax functions: warm-up, synchronized batches, median.

Shared by the benchmarks (`benchmarks/harness.py`) and the autotuner (`jna.tuning.tuner`).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def median_ms(fn, *args, warmup: int = 2, repeats: int = 10, inner: int = 1) -> float:
    """Median milliseconds of one call of ``fn(*args)``.

    Each of ``repeats`` samples runs ``inner`` back-to-back calls and synchronizes once at the
    end (so dispatch overlaps device work, as in a training loop), after ``warmup`` synchronized
    calls that keep compilation and first-run effects out of the numbers.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) * 1e3 / inner)
    return statistics.median(samples)


def budgeted_median_ms(jitted, args, budget_s: float) -> float:
    """`median_ms` of ``jitted(*args)`` with a repeat count that fits ``budget_s`` (>= 3 samples;
    calls shorter than 20 ms are batched so one sample is not all dispatch)."""
    jax.block_until_ready(jitted(*args))  # compile + first run
    start = time.perf_counter()
    jax.block_until_ready(jitted(*args))
    one = time.perf_counter() - start
    repeats = int(max(3, min(30, budget_s / max(one, 1e-4) / 2)))
    inner = int(max(1, min(20, 0.02 / max(one, 1e-6))))
    return median_ms(jitted, *args, warmup=1, repeats=repeats, inner=inner)


def fwd_bwd(fn):
    """jit of the q/k/v gradients of ``sum(fn(q, k, v) * dout)`` (``dout`` an argument, not a
    constant XLA could fold): what "forward+backward" times."""
    def loss(q, k, v, dout):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * dout.astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

