"""The relative positional bias as tile-offset class blocks (`jna._src.rpb_tiles`), host side.

What the fused-mosaic kernels rely on (their results are checked against the oracle in
`test_fused_mosaic_sim.py` and, on a GPU, `test_rpb_mosaic.py`):

* `tile_bias`: for every tile pair any kernel visits (all dilation groups, padding included),
  the block of the pair's class (`RpbPlan.pair_class`) holds, at tile-local query ``i`` and key
  ``j``, the bias of that (query, key) by `jna.semantics.relative_position_index_of_key` when
  the offset is within the table, and 0 otherwise;
* `tile_bias_grad` is `tile_bias`'s adjoint (equal to JAX's transpose of the gather) and gives
  the same bits on every call;
* the pair lists of the d_rpb kernel hold every visited pair with real queries once, under its
  class, and nothing else;
* the in-kernel (traced int32) class formula equals the host's.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jna import semantics
from jna._src import plan as planning
from jna._src import rpb_tiles

# shape, kernel_size, dilation, q_tile, kv_tile
CASES = {
    "1d-dilated-q-smaller": ((20,), (5,), (2,), (8,), (16,)),
    "1d-even-kernel-window-is-map": ((8,), (8,), (1,), (4,), (2,)),
    "2d-dilated-nonsquare": ((7, 9), (3, 4), (2, 1), (4, 8), (8, 4)),
    "3d-dilated": ((5, 6, 4), (3, 2, 3), (1, 2, 1), (2, 2, 4), (4, 2, 2)),
}


def _plans(name):
    shape, kernel, dilation, q_tile, kv_tile = CASES[name]
    params = semantics.normalize_params(shape, kernel, 1, dilation, False)
    plan = planning.make_plan(params, q_tile, kv_tile)
    return plan, rpb_tiles.make_rpb_plan(plan)


def _visited(plan):
    """Every (group, qt, kt) the forward visits (per-axis tuples)."""
    for g in itertools.product(*[range(a.dilation) for a in plan.axes]):
        for qt in itertools.product(*[range(a.num_q_tiles) for a in plan.axes]):
            ranges = [range(a.kv_first[g[i], qt[i]], a.kv_first[g[i], qt[i]] + a.kv_count[g[i], qt[i]])
                      for i, a in enumerate(plan.axes)]
            for kt in itertools.product(*ranges):
                yield g, qt, kt


@pytest.mark.parametrize("name", list(CASES))
def test_blocks_hold_each_pairs_bias(name):
    plan, rplan = _plans(name)
    kernel = CASES[name][1]
    rpb = np.random.default_rng(0).standard_normal((3, *[2 * k - 1 for k in kernel])).astype(np.float32)
    blocks = np.asarray(rpb_tiles.tile_bias(jnp.asarray(rpb), rplan))
    assert blocks.shape == (3, rplan.num_classes, rplan.q_tokens, rplan.kv_tokens)
    q_local = np.indices([a.q_tile for a in plan.axes]).reshape(plan.rank, -1)  # row-major
    k_local = np.indices([a.kv_tile for a in plan.axes]).reshape(plan.rank, -1)
    for _, qt, kt in _visited(plan):
        want = np.zeros((3, rplan.q_tokens, rplan.kv_tokens), np.float32)
        index, inside = [], True
        for a, ax in enumerate(plan.axes):
            x = qt[a] * ax.q_tile + q_local[a][:, None]  # group coordinates
            y = kt[a] * ax.kv_tile + k_local[a][None, :]
            u = semantics.relative_position_index_of_key(x, y, ax.kernel_size, 1)
            inside = inside & (u >= 0) & (u <= 2 * ax.kernel_size - 2)
            index.append(np.clip(u, 0, 2 * ax.kernel_size - 2))
        want[:] = np.where(inside, rpb[(slice(None), *index)], 0.0)
        np.testing.assert_array_equal(blocks[:, rplan.pair_class(qt, kt)], want, err_msg=f"{qt} {kt}")


@pytest.mark.parametrize("name", list(CASES))
def test_gradient_is_the_adjoint_and_deterministic(name):
    _, rplan = _plans(name)
    kernel = CASES[name][1]
    rng = np.random.default_rng(1)
    rpb = jnp.asarray(rng.standard_normal((2, *[2 * k - 1 for k in kernel])), jnp.float32)
    d = jnp.asarray(rng.standard_normal((2, rplan.num_classes, rplan.q_tokens, rplan.kv_tokens)),
                    jnp.float32)
    _, vjp = jax.vjp(lambda r: rpb_tiles.tile_bias(r, rplan), rpb)
    want = np.asarray(vjp(d)[0])
    grad = jax.jit(lambda d: rpb_tiles.tile_bias_grad(d, rplan))
    got = np.asarray(grad(d))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(grad(d)), got)


@pytest.mark.parametrize("name", list(CASES))
def test_pair_lists_cover_the_pairs_with_real_queries_once(name):
    plan, rplan = _plans(name)
    want = {}
    for g, qt, kt in _visited(plan):
        real = all(qt[a] * ax.q_tile < semantics.group_length(g[a], ax.q_length, ax.dilation)
                   for a, ax in enumerate(plan.axes))
        if real:
            want.setdefault((g, rplan.pair_class(qt, kt)), []).append((qt, kt))
    got = {}
    for g in itertools.product(*[range(a.dilation) for a in plan.axes]):
        for c in range(rplan.num_classes):
            cls = np.unravel_index(c, rplan.counts)
            per_axis = [[(ax.items_q[g[a], cls[a], n], ax.items_kv[g[a], cls[a], n])
                         for n in range(ax.items_count[g[a], cls[a]])] for a, ax in enumerate(rplan.axes)]
            pairs = [tuple(zip(*p)) for p in itertools.product(*per_axis)]
            if pairs:
                got[g, c] = pairs
    assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in want.items()}


def test_traced_class_formula_matches_the_host():
    for name in CASES:
        plan, rplan = _plans(name)
        cls = jax.jit(lambda q, k, rplan=rplan: rplan.pair_class(list(q), list(k)))
        for _, qt, kt in _visited(plan):
            traced = cls(jnp.asarray(qt, jnp.int32), jnp.asarray(kt, jnp.int32))
            assert int(traced) == rplan.pair_class(qt, kt), (name, qt, kt)


def test_causal_or_strided_plan_has_no_classes():
    params = semantics.normalize_params((16,), 5, 2, 1, False)
    with pytest.raises(NotImplementedError, match="rpb"):
        rpb_tiles.make_rpb_plan(planning.make_plan(params, (8,), (8,)))
