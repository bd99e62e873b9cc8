"""The tile planner and the fused-triton tile choice, checked against the float64 oracle's mask.

For random 1-D problems (every multi-dimensional plan is a product of per-axis plans) and each
dilation group: every allowed (query, key) pair lies in exactly one visited tile pair, no visited
"full" pair holds a forbidden pair, the transposed lists (for dK/dV) are the exact transpose of
the forward lists, and the vectorized pair counts equal the tables'. Also: the token permutation
round-trips, the tile chooser's picks are valid, an explicit config overrides it without changing
results, and head dims the kernels cannot take raise NotImplementedError.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest

import jna
from jna._src import plan as planning
from jna import semantics
from jna.backends.triton import fused as ft
from jna.backends import tiling
from jna_tests import oracle


def _random_axis(rng):
    length = int(rng.integers(4, 60))
    k = int(rng.integers(2, length + 1))
    d = int(rng.integers(1, length // k + 1))
    s = int(rng.integers(1, k + 1))
    causal = bool(rng.integers(2))
    tq, tk = (int(2 ** rng.integers(0, 5)) for _ in range(2))
    return length, k, s, d, causal, tq, tk


@pytest.mark.parametrize("seed", range(6))
def test_plan_covers_every_allowed_pair_exactly_once(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        length, k, s, d, causal, tq, tk = _random_axis(rng)
        params = semantics.normalize_params((length,), k, s, d, causal)
        ax = planning.make_plan(params, (tq,), (tk,)).axes[0]
        full_mask = oracle.axis_mask(length, k, s, d, causal)
        config = (length, k, s, d, causal, tq, tk)
        for g, lg in enumerate(ax.group_lengths):
            members = np.arange(g, length, d)  # original coordinates of group g, in order
            allowed = full_mask[np.ix_(members, members)]
            assert lg == len(members), config
            cover = np.zeros_like(allowed, dtype=int)
            for qt in range(ax.num_q_tiles):
                for kt in range(ax.kv_first[g, qt], ax.kv_first[g, qt] + ax.kv_count[g, qt]):
                    block = np.zeros_like(allowed)
                    block[qt * tq:(qt + 1) * tq, kt * tk:(kt + 1) * tk] = True
                    cover += block
                    if ax.pair_full[g, qt, kt]:
                        assert allowed[block].all(), ("full pair holds a masked pair", config, g, qt, kt)
                        assert (kt + 1) * tk <= lg, ("full pair holds padding", config, g, qt, kt)
            assert (cover[allowed] == 1).all(), ("allowed pair not covered exactly once", config, g)
            for kt in range(ax.num_kv_tiles):  # transposed lists: Q tiles with real queries only
                rows = [qt for qt in range(ax.num_q_tiles) if qt * tq < lg
                        and ax.kv_first[g, qt] <= kt < ax.kv_first[g, qt] + ax.kv_count[g, qt]]
                assert ax.q_count[g, kt] == len(rows), config
                if rows:
                    assert ax.q_first[g, kt] == rows[0], config
        assert planning.axis_pair_counts(length, k, s, d, causal, tq, tk) == (ax.useful_pairs, ax.computed_pairs)


def test_permute_round_trips_and_groups_dilation():
    params = semantics.normalize_params((9, 10, 7), (3, 4, 2), (1, 2, 2), (2, 2, 1), (False, True, False))
    plan = planning.make_plan(params, (4, 2, 2), (2, 4, 2))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 9, 10, 7, 3, 5)), jnp.float32)
    for tile in ("q", "kv"):
        y = planning.permute(x, plan, tile, padded_dim=8)
        assert y.shape[0] == 2 * plan.num_groups and y.shape[-1] == 8
        np.testing.assert_array_equal(planning.unpermute(y, plan, tile, (9, 10, 7), 5), x)
    # Token (b=1, x=(3, 4, 6)) sits in group (1, 0, 0), group coords (1, 2, 6).
    y = planning.permute(x, plan, "q")
    g = 1 * 2 + 0  # row-major over dilations (2, 2, 1)
    (t0, l0), (t1, l1), (t2, l2) = divmod(1, 4), divmod(2, 2), divmod(6, 2)
    ax = plan.axes
    tile_id = (t0 * ax[1].num_q_tiles + t1) * ax[2].num_q_tiles + t2
    row = tile_id * plan.q_tile_tokens + (l0 * 2 + l1) * 2 + l2
    np.testing.assert_array_equal(y[1 * plan.num_groups + g, row], x[1, 3, 4, 6])


@pytest.mark.parametrize("shape,kernel,stride,dilation", [
    ((32768,), 2048, 1, 1), ((256, 256), 80, 16, 1), ((30, 48, 80), (18, 24, 24), 1, 1),
    ((56, 56), 7, 1, 1), ((28, 28), 7, 1, 4), ((5,), 3, 1, 1),
])
def test_tile_choice_is_valid(shape, kernel, stride, dilation):
    params = semantics.normalize_params(shape, kernel, stride, dilation)
    cfg = ft._choose(params, 128)
    for tile in (cfg.q_tile, cfg.kv_tile):
        assert len(tile) == len(shape)
        assert all(t & (t - 1) == 0 for t in tile)
        assert np.prod(tile) >= 16  # Triton's dot needs 16 rows/columns
    assert 0 < tiling.tile_efficiency(params, cfg.q_tile, cfg.kv_tile) <= 1
    plan = planning.make_plan(params, cfg.q_tile, cfg.kv_tile)
    assert np.isclose(plan.efficiency, tiling.tile_efficiency(params, cfg.q_tile, cfg.kv_tile))


def test_explicit_config_changes_tiles_not_results():
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 12, 10, 2, 16)), jnp.float32) for _ in range(3))
    na = functools.partial(jna.na2d, kernel_size=(5, 4), stride=(2, 1), dilation=(2, 1))
    mask = oracle.na_mask((12, 10), (5, 4), (2, 1), (2, 1), False)
    want, _ = oracle.attention(np.asarray(q, np.float64), np.asarray(k, np.float64),
                               np.asarray(v, np.float64), mask)
    for cfg in (ft.TritonConfig((4, 4), (4, 4)), ft.TritonConfig((2, 8), (8, 2), direct_layout=False)):
        np.testing.assert_allclose(na(q, k, v, backend=ft.FusedTriton(cfg)), want, atol=1e-4)
    with pytest.raises(ValueError, match="power of two"):
        ft.TritonConfig((3, 4), (4, 4))


def test_head_dim_beyond_kernels_is_not_implemented():
    q = jnp.zeros((1, 8, 1, 320), jnp.float32) + 1.0
    with pytest.raises(NotImplementedError, match="head_dim 320"):
        jna.na1d(q, q, q, kernel_size=3, backend="fused-triton")
    assert jna.na1d(q, q, q, kernel_size=3, backend="reference").shape == q.shape
