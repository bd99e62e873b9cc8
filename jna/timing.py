"""Wall-clock timing of jax functions: warm-up, synchronized batches, median."""

from __future__ import annotations

import statistics
import time

import jax


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
