"""fused-triton's key-region walk (issue 16): each Q tile visits the union of its queries' windows
in ``kv_tile`` chunks from any token offset, instead of the aligned KV tiles that cover it.

The planner's region tables are checked against a brute-force enumeration of the windows (every
allowed key of every real query lies in a visited chunk; the no-mask flags are exact; chunks stay
inside the group where it is long enough), and the kernels (forward, dQ, dK/dV, forward mode)
against the float64 oracle in the direct and grouped layouts, in interpret mode on the CPU and on
real kernels on a GPU; their lowering for sm90 is checked too.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jna import semantics
from jna._src import plan as planning
from jna._src.arguments import check_call
from jna.backends.triton import fused as fused_triton
from jna_tests import oracle
from jna_tests.common import Config, f64, make_inputs


def _brute_windows(lg, kernel_size, stride, is_causal):
    """Per query of an undilated axis of length ``lg``: the set of allowed keys (the oracle's
    element-wise rule, not the window functions the planner uses)."""
    return [{y for y in range(lg) if oracle.axis_allowed(x, y, lg, kernel_size, stride, 1, is_causal)}
            for x in range(lg)]


AXES = [  # (length, kernel_size, stride, dilation, is_causal, q_tile, kv_tile)
    (28, 7, 1, 4, False, 8, 8), (14, 7, 1, 1, False, 8, 16), (56, 7, 1, 1, False, 8, 4),
    (30, 5, 1, 3, True, 4, 8), (14, 7, 2, 1, False, 4, 8), (64, 13, 1, 1, False, 16, 8),
    (37, 9, 3, 2, True, 8, 2), (16, 3, 1, 1, False, 16, 16),
]


@pytest.mark.parametrize("axis", AXES, ids=lambda a: "L{}K{}s{}d{}c{}_q{}kv{}".format(*map(int, a)))
def test_region_tables_cover_every_window(axis):
    length, kernel_size, stride, dilation, is_causal, q_tile, kv_tile = axis
    ax = planning._plan_axis(length, kernel_size, stride, dilation, is_causal, q_tile, kv_tile, region=True)
    assert ax.region and ax.max_kv_steps >= 1
    computed = 0
    for g in range(dilation):
        lg = semantics.group_length(g, length, dilation)
        allowed = _brute_windows(lg, kernel_size, stride, is_causal)
        for qt in range(ax.num_q_tiles):
            origin, steps = int(ax.kv_origin_tok[g, qt]), int(ax.kv_steps[g, qt])
            assert origin >= 0 and 1 <= steps <= ax.max_kv_steps
            if steps * kv_tile <= lg:
                assert origin + steps * kv_tile <= lg  # in bounds: no masked loads needed
            queries = range(qt * q_tile, min((qt + 1) * q_tile, lg))
            covered = set(range(origin, origin + steps * kv_tile))
            for x in queries:
                assert allowed[x] <= covered, (g, qt, x)
            for j in range(steps):
                chunk = set(range(origin + j * kv_tile, origin + (j + 1) * kv_tile))
                full = bool(queries) and all(chunk <= allowed[x] for x in queries)
                assert bool(ax.region_full[g, qt, j]) == full, (g, qt, j)
            computed += len(queries) and q_tile * kv_tile * steps
        for kt in range(ax.num_kv_tiles):  # the mirror walk of the dK/dV kernel
            origin, steps = int(ax.q_origin_tok[g, kt]), int(ax.q_steps[g, kt])
            keys = set(range(kt * kv_tile, (kt + 1) * kv_tile))
            touching = {x for x in range(lg) if allowed[x] & keys}
            covered = set(range(origin, origin + steps * q_tile))
            assert touching <= covered and origin >= 0 and steps <= ax.max_q_steps, (g, kt)
            assert steps == 0 or touching, (g, kt)
            if steps * q_tile <= lg:
                assert origin + steps * q_tile <= lg
            for j in range(steps):
                chunk = range(origin + j * q_tile, origin + (j + 1) * q_tile)
                full = chunk[-1] < lg and all(keys <= allowed[x] for x in chunk)
                assert bool(ax.region_q_full[g, kt, j]) == full, (g, kt, j)
    assert computed == ax.computed_pairs
    useful, counted = planning.axis_pair_counts(length, kernel_size, stride, dilation, is_causal, q_tile,
                                                kv_tile, region=True)
    assert (useful, counted) == (ax.useful_pairs, ax.computed_pairs)


def test_region_walk_never_computes_more_than_aligned_tiles():
    for length, kernel_size, stride, dilation, is_causal, q_tile, kv_tile in AXES:
        args = (length, kernel_size, stride, dilation, is_causal, q_tile, kv_tile)
        assert planning.axis_pair_counts(*args, region=True)[1] <= planning.axis_pair_counts(*args)[1], args


CASES = {
    # NAT-like: no dilation, tiles divide the map (direct layout), 2-step chunks on one axis
    "2d-direct": (Config((16, 16), (5, 5), (1, 1), (1, 1), (False, False), heads=2, heads_kv=1, dim=16,
                         dim_v=16), (4, 4), (4, 8)),
    # DiNAT-like: dilation, ragged group length 6 (grouped layout, masked chunk loads), GQA
    "2d-dilated-ragged": (Config((12, 12), (5, 5), (1, 1), (2, 2), (False, False), heads=4, heads_kv=2,
                                 dim=16, dim_v=16), (4, 4), (8, 2)),
    # tiles of >= 16 tokens (Triton's dot; `fused_triton.MIN_TILE_TOKENS`): group length 40,
    # ragged in its last tile, several chunks per Q tile
    "1d-dilated-causal": (Config((120,), (13,), (1,), (3,), (True,), batch=2, heads=2, heads_kv=2, dim=32,
                                 dim_v=16), (16,), (16,)),
    "2d-strided-causal": (Config((14, 10), (7, 3), (2, 1), (1, 1), (False, True), heads=2, heads_kv=1,
                                 dim=16, dim_v=32), (4, 4), (8, 2)),
    "3d-mixed": (Config((6, 8, 8), (3, 3, 5), (1, 2, 1), (2, 1, 1), (True, False, False), heads=2,
                        heads_kv=1, dim=16, dim_v=16), (2, 2, 4), (2, 4, 4)),
}
FAST = ("2d-dilated-ragged",)  # interpret mode costs ~5 s a case; the rest in the slow tier and on the GPU


def _problem(cfg: Config, inp):
    return check_call(inp.q, inp.k, inp.v, cfg.kernel_size, cfg.stride, cfg.dilation, cfg.is_causal,
                      cfg.scale, None, None, None)


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in sorted(CASES)])
def test_region_walk_matches_the_oracle(name, monkeypatch):
    """Forward (out, lse), backward (dq, dk, dv through both outputs) and forward mode of the
    region walk against the float64 oracle; the call really plans the region walk in place."""
    cfg, q_tile, kv_tile = CASES[name]
    inp = make_inputs(cfg, jnp.float32, seed=18)
    problem = _problem(cfg, inp)
    config = dataclasses.replace(fused_triton.default_config(problem), q_tile=q_tile, kv_tile=kv_tile,
                                 kv_region=True)
    assert fused_triton.region_applies(problem, config)
    seen = []
    real_op = fused_triton._op
    monkeypatch.setattr(fused_triton, "_op", lambda st, *a: (seen.append(st), real_op(st, *a))[1])
    q64, k64, v64 = (f64(x) for x in (inp.q, inp.k, inp.v))
    want_out, want_lse = oracle.na(q64, k64, v64, **cfg.na_kwargs())
    want_grads = oracle.na_bwd(q64, k64, v64, f64(inp.dout), f64(inp.dlse), **cfg.na_kwargs())[:3]
    f = lambda q, k, v: fused_triton.attention(q, k, v, problem, config)
    (out, lse), vjp = jax.vjp(f, inp.q, inp.k, inp.v)
    assert seen and all(st.plan.region and (st.layout.direct or st.layout.grouped) for st in seen)
    assert oracle.rel_l2(f64(out), want_out) < 1e-5, name
    assert np.max(np.abs(f64(lse) - want_lse)) < 1e-4, name
    for got, want, what in zip(vjp((inp.dout, inp.dlse)), want_grads, "qkv"):
        assert oracle.rel_l2(f64(got), want) < 1e-4, (name, "d" + what)
    tangents = tuple(jnp.asarray(np.random.default_rng(5).standard_normal(x.shape), jnp.float32)
                     for x in (inp.q, inp.k, inp.v))
    _, (tout, tlse) = jax.jvp(f, (inp.q, inp.k, inp.v), tangents)
    eps = 1e-4
    plus = oracle.na(*(a + eps * f64(t) for a, t in zip((q64, k64, v64), tangents)), **cfg.na_kwargs())
    minus = oracle.na(*(a - eps * f64(t) for a, t in zip((q64, k64, v64), tangents)), **cfg.na_kwargs())
    assert oracle.rel_l2(f64(tout), (plus[0] - minus[0]) / (2 * eps)) < 1e-4, name
    assert oracle.rel_l2(f64(tlse), (plus[1] - minus[1]) / (2 * eps)) < 1e-4, name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("shape,kernel_size,dilation", [((56, 56), 7, 1), ((28, 28), 7, 4), ((14, 14), 7, 2)])
def test_region_walk_half_precision_on_gpu(shape, kernel_size, dilation, dtype):
    """NAT/DiNAT layer shapes, head dim 32, half precision: the region walk against the float64
    oracle (out, dq, dk, dv) at the usual half-precision tolerances, and bitwise repeatable."""
    cfg = Config(shape, (kernel_size,) * 2, (1, 1), (dilation,) * 2, (False, False), batch=2, heads=4,
                 heads_kv=4, dim=32, dim_v=32)
    inp = make_inputs(cfg, dtype, seed=7)
    problem = _problem(cfg, inp)
    configs = [c for _, c, _ in fused_triton.FusedTriton().candidate_configs(problem, 2) if c.kv_region]
    assert configs
    q64, k64, v64 = (f64(x) for x in (inp.q, inp.k, inp.v))
    want_out, _ = oracle.na(q64, k64, v64, **cfg.na_kwargs())
    want_grads = oracle.na_bwd(q64, k64, v64, f64(inp.dout), np.zeros(want_out.shape[:-1]), **cfg.na_kwargs())[:3]
    for config in configs[:3]:
        def grads(q, k, v, config=config):
            out, vjp = jax.vjp(lambda q, k, v: fused_triton.attention(q, k, v, problem, config)[0], q, k, v)
            return out, vjp(inp.dout)
        run = jax.jit(grads)
        out, got = run(inp.q, inp.k, inp.v)
        assert oracle.rel_l2(f64(out), want_out) < 1e-2, config
        for g, w, what in zip(got, want_grads, "qkv"):
            assert oracle.rel_l2(f64(g), w) < 2e-2, (config, "d" + what)
        again = run(inp.q, inp.k, inp.v)
        for a, b in zip(jax.tree_util.tree_leaves((out, got)), jax.tree_util.tree_leaves(again)):
            assert np.array_equal(np.asarray(a), np.asarray(b)), config


def test_region_kernels_lower_to_triton_for_cuda(monkeypatch):
    """The region walk's forward, dQ and tangent kernels (unaligned chunk loads; grouped layout
    with masked ones) lower to Triton IR for an sm90 GPU from this machine (`jax.export`)."""
    from jax import export

    from jna._src import compat

    monkeypatch.setattr(fused_triton, "_interpret", lambda: False)
    spec = jax.ShapeDtypeStruct
    texts = []
    for shape, dilation in (((56, 56), 1), ((28, 28), 4)):
        q = spec((2, *shape, 4, 32), jnp.bfloat16)
        zeros = jnp.zeros(q.shape, q.dtype)
        problem = check_call(zeros, zeros, zeros, 7, 1, dilation, False, None, None, None, None)
        config = dataclasses.replace(fused_triton.default_config(problem), q_tile=(8, 8), kv_tile=(8, 16),
                                     kv_region=True)
        assert fused_triton.region_applies(problem, config)

        def loss(q, k, v, problem=problem, config=config):
            out, lse = fused_triton.attention(q, k, v, problem, config)
            return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

        def tangent(q, k, v, problem=problem, config=config):
            return jax.jvp(lambda q, k, v: fused_triton.attention(q, k, v, problem, config), (q, k, v), (q, k, v))[1]

        triton = "__gpu$xla.gpu.triton"
        with compat.triton_lowering_for_cuda(90):
            for f in (jax.grad(loss, argnums=(0, 1, 2)), tangent):
                texts.append(export.export(jax.jit(f), platforms=["cuda"],
                                           disabled_checks=[export.DisabledSafetyCheck.custom_call(triton)])(
                    q, q, q).mlir_module())
    for name in ("jna_fused_na_fwd", "jna_fused_na_dq", "jna_fused_na_dkv", "jna_fused_na_tangent"):
        assert any(f'name = "{name}"' in t for t in texts), name


def test_candidates_include_the_region_walk_only_where_it_applies():
    def problem(shape, dilation, dim=32):
        x = jnp.zeros((1, *shape, 2, dim), jnp.bfloat16)
        return check_call(x, x, x, 7, 1, dilation, False, None, None, None, None)

    for shape, dilation, expect in (((56, 56), 1, True), ((28, 28), 4, True), ((30, 28), 4, False)):
        cands = fused_triton.FusedTriton().candidate_configs(problem(shape, dilation), 2)
        region = [c for _, c, _ in cands if c.kv_region]
        assert bool(region) == expect, (shape, dilation)
        assert all(fused_triton.region_applies(problem(shape, dilation), c) for c in region)
        assert any(not c.kv_region for _, c, _ in cands)


def test_tiles_under_16_tokens_are_an_error():
    """Triton's dot needs 16 rows and columns; 4-token 1-D tiles silently doubled the output on
    an H200, so a direct call with such a config is refused on every device."""
    cfg = Config((30,), (5,), (1,), (3,), (True,), heads=2, heads_kv=2, dim=16, dim_v=16)
    inp = make_inputs(cfg, jnp.float32)
    problem = _problem(cfg, inp)
    for q_tile, kv_tile, name in (((4,), (16,), "q_tile"), ((16,), (8,), "kv_tile")):
        config = dataclasses.replace(fused_triton.default_config(problem), q_tile=q_tile, kv_tile=kv_tile)
        with pytest.raises(ValueError, match=rf"config\.{name} = .* tokens; a tile needs >= 16"):
            fused_triton.attention(inp.q, inp.k, inp.v, problem, config)
