"""`jna._src.finite.all_finite`, the check that guards the fused kernels' fast path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jna._src.finite import all_finite


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_flags_one_non_finite_value_anywhere(dtype, bad):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 50, 7)), dtype)
    assert bool(all_finite(x)) and bool(jax.jit(all_finite)(x))
    for index in [(0, 0, 0), (2, 17, 3), (2, 49, 6)]:
        y = x.at[index].set(bad)
        assert not bool(all_finite(y)) and not bool(jax.jit(all_finite)(y)), index


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_extreme_finite_values_pass(dtype):
    info = jnp.finfo(dtype)
    x = jnp.asarray([info.max, -info.max, info.tiny, -info.tiny, 0.0, -0.0, info.smallest_subnormal], dtype)
    assert bool(all_finite(x))


def test_float64():
    x = np.ones((4, 5), np.float64)  # numpy float64 in: jax keeps it only under x64, else float32
    assert bool(all_finite(jnp.asarray(x))) and not bool(all_finite(jnp.asarray(x).at[3, 4].set(jnp.nan)))
