"""fused-triton's containment of non-finite values (`fused._forward_call`).

The fast forward kernel sums ``P V`` over whole K/V tiles, so ``0 * v`` of a masked non-finite
value would reach queries that never see it; the second launch reruns exactly the programs whose
fast output tile is non-finite, with the values contained. Here one value row is NaN or +-inf,
in a tile that queries on both sides of its windows load: the queries whose window holds it must
be non-finite, every other output and every lse must equal the clean oracle's. On the CPU in
interpret mode; on a GPU (the half-precision case too) with real kernels, where the tensor cores'
``0 * inf`` decides whether a leak shows.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from jna._src.arguments import check_call
from jna.backends.triton import fused as fused_triton
from jna_tests import oracle
from jna_tests.common import Config, f64, make_inputs

CFG = Config((64,), (7,), (1,), (1,), (False,), batch=2, heads=2, heads_kv=1, dim=16, dim_v=16)
BAD_KEY = 21  # tile 1 of 16-token tiles; queries 18-24 see it, their tile neighbours do not


def _run(dtype, bad, region: bool):
    inp = make_inputs(CFG, jnp.float32, seed=31)
    q, k, v = (x.astype(dtype) for x in (inp.q, inp.k, inp.v))
    v_bad = v.at[0, BAD_KEY].set(bad)
    problem = check_call(q, k, v_bad, CFG.kernel_size, CFG.stride, CFG.dilation, CFG.is_causal,
                         CFG.scale, None, None, None)
    config = dataclasses.replace(fused_triton.default_config(problem), q_tile=(16,), kv_tile=(16,),
                                 kv_region=region)
    out, lse = fused_triton.attention(q, k, v_bad, problem, config)
    want_out, want_lse = oracle.na(f64(q), f64(k), f64(v), **CFG.na_kwargs())
    return np.asarray(out, np.float64), np.asarray(lse, np.float64), want_out, want_lse


def _check(dtype, bad, region, tol):
    out, lse, want_out, want_lse = _run(dtype, bad, region)
    sees = oracle.na_mask(CFG.shape, **CFG.na_kwargs())[:, BAD_KEY]
    assert 0 < sees.sum() < sees.size
    assert not np.isfinite(out[0][sees]).any(), "queries whose window holds the value must be non-finite"
    assert np.isfinite(out[0][~sees]).all() and np.isfinite(out[1]).all()
    assert oracle.rel_l2(out[0][~sees], want_out[0][~sees]) < tol
    assert oracle.rel_l2(out[1], want_out[1]) < tol
    np.testing.assert_allclose(lse, want_lse, atol=20 * tol)


@pytest.mark.parametrize("bad,region", [(np.nan, False), (np.inf, True), (-np.inf, False)],
                         ids=["nan-aligned", "inf-region", "-inf-aligned"])
def test_a_non_finite_value_reaches_only_its_windows(bad, region):
    _check(jnp.float32, bad, region, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_a_non_finite_value_reaches_only_its_windows_half_precision(bad, dtype):
    _check(dtype, bad, False, 2e-2)
