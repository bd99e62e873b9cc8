"""The relative positional bias inside fused-triton's kernels (issue 18).

`test_rpb.py` runs fused-triton through the public API like every backend with ``supports_rpb``;
this file covers what is specific to the fused kernels:

* every layout and walk (permuted, direct, grouped with ragged groups, the key-region walk in
  the direct and grouped layouts, 3-D, GQA) against the float64 oracle: out, lse, dq/dk/dv,
  d_rpb and the forward mode (tangent of rpb included), with the call checked to really take
  that layout;
* the bias's per-class blocks (`bias_blocks`: every visited pair finds the block holding its
  bias) and the gather the kernels fall back to past the blocks' memory budget;
* the d_rpb pass's host tables (`bias_grad.delta_walk`: every allowed pair in exactly one
  visited tile pair, grouped by tile offset) and its XLA binning (`bias_grad._bin`) against a
  brute-force scatter; its memory chunking; a non-finite value with a bias (the containing
  forward kernel takes the bias too);
* the kernels' lowering for an sm90 GPU from this machine;
* on a GPU (``gpu`` marker): half precision against the oracle on NAT/DiNAT layer shapes and
  d_rpb bitwise equal over five runs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jna import semantics
from jna._src import plan as planning
from jna._src.arguments import check_call
from jna.backends.triton import bias_blocks, bias_grad
from jna.backends.triton import fused as fused_triton
from jna_tests import oracle
from jna_tests.common import Config, f64, make_inputs

TC = fused_triton.TritonConfig


def _cfg(shape, kernel_size, dilation=1, **kw):
    rank = len(shape)
    per = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * rank
    kw = dict(dict(heads=4, heads_kv=2, dim=16, dim_v=16), **kw)
    return Config(tuple(shape), per(kernel_size), (1,) * rank, per(dilation), (False,) * rank, **kw)


# name: (case, config, expected (direct, grouped, region))
LAYOUTS = {  # tiles of >= 16 tokens (`fused_triton.MIN_TILE_TOKENS`)
    "permuted": (_cfg((16, 16), 5), TC((4, 4), (4, 8), direct_layout=False), (False, False, False)),
    "direct": (_cfg((16, 16), 5), TC((4, 4), (4, 8)), (True, False, False)),
    "direct-region": (_cfg((16, 16), 5, dim_v=32), TC((4, 4), (4, 8), kv_region=True), (True, False, True)),
    "grouped-ragged": (_cfg((12, 12), 5, 2), TC((4, 4), (4, 4)), (False, True, False)),
    "grouped-region": (_cfg((12, 12), (5, 3), 2, heads_kv=1), TC((4, 4), (4, 4), kv_region=True),
                       (False, True, True)),
    "permuted-dilated-1d": (_cfg((39,), 4, 2, batch=2), TC((16,), (16,), direct_layout=False), (False, False, False)),
    "3d-grouped-region": (_cfg((6, 8, 8), (3, 3, 5), (2, 1, 1)), TC((2, 2, 4), (2, 4, 4), kv_region=True),
                          (False, True, True)),
}
FAST = ("grouped-region",)  # ~5 s each in interpret mode; the rest in the slow tier


def _rpb(cfg: Config, seed: int, dtype=jnp.float32):
    rng = np.random.default_rng(100 + seed)
    shape = (cfg.heads, *(2 * k - 1 for k in cfg.kernel_size))
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32)).astype(dtype)


def _problem(cfg: Config, inp, rpb):
    return check_call(inp.q, inp.k, inp.v, cfg.kernel_size, cfg.stride, cfg.dilation, cfg.is_causal,
                      cfg.scale, None, None, None, rpb=rpb)


def _window(cfg: Config, rpb):
    return dict(kernel_size=cfg.kernel_size, dilation=cfg.dilation, scale=cfg.scale, rpb=f64(rpb))


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in LAYOUTS]
                         + [pytest.param("gather:grouped-region", marks=pytest.mark.slow), "gather:direct-region"])
def test_layouts_against_the_oracle(name, monkeypatch):
    """Forward, every gradient (through out and lse) and the forward mode in q, k, v and rpb.
    ``gather:``: the same with the class blocks over their budget (the kernels gather the bias
    from the table)."""
    gather = name.startswith("gather:")
    name = name.removeprefix("gather:")
    if gather:
        monkeypatch.setattr(bias_blocks, "BLOCKS_BUDGET_BYTES", 0)
    cfg, config, layout = LAYOUTS[name]
    seed = list(LAYOUTS).index(name)
    inp = make_inputs(cfg, jnp.float32, seed=seed)
    rpb = _rpb(cfg, seed)
    problem = _problem(cfg, inp, rpb)
    seen = []
    real_op = fused_triton._op_rpb
    monkeypatch.setattr(fused_triton, "_op_rpb", lambda st, *a: (seen.append(st), real_op(st, *a))[1])
    f = lambda q, k, v, b: fused_triton.attention(q, k, v, problem, config, rpb=b)
    (out, lse), vjp = jax.vjp(f, inp.q, inp.k, inp.v, rpb)
    assert seen and {(st.layout.direct, st.layout.grouped, st.plan.region) for st in seen} == {layout}
    assert all(st.bias and st.bias_blocks != gather for st in seen)
    q64, k64, v64 = (f64(x) for x in (inp.q, inp.k, inp.v))
    want_out, want_lse = oracle.na(q64, k64, v64, **_window(cfg, rpb))
    want = oracle.na_bwd(q64, k64, v64, f64(inp.dout), f64(inp.dlse), **_window(cfg, rpb))
    assert np.max(np.abs(f64(out) - want_out)) < 1e-4, name
    assert np.max(np.abs(f64(lse) - want_lse)) < 1e-4, name
    for got, w, what in zip(vjp((inp.dout, inp.dlse)), (*want[:3], want[5]), ("dq", "dk", "dv", "d_rpb")):
        assert got.dtype == jnp.float32
        assert np.max(np.abs(f64(got) - w)) < 1e-3, (name, what)
    rng = np.random.default_rng(5)
    primals = (inp.q, inp.k, inp.v, rpb)
    tangents = tuple(jnp.asarray(rng.standard_normal(x.shape), jnp.float32) for x in primals)
    _, (tout, tlse) = jax.jvp(f, primals, tangents)
    eps = 1e-4
    at = lambda e: oracle.na(*(f64(x) + e * f64(t) for x, t in zip(primals[:3], tangents[:3])),
                             **_window(cfg, f64(rpb) + e * f64(tangents[3])))
    (o1, l1), (o0, l0) = at(eps), at(-eps)
    # 1e-3 of the tangents' scale: they reach |3| on the 3-D case, where float32 sums err by
    # ~1e-3 (the reference backend's jvp as much)
    for got, want, what in ((tout, (o1 - o0) / (2 * eps), "tout"), (tlse, (l1 - l0) / (2 * eps), "tlse")):
        assert np.max(np.abs(f64(got) - want)) < 1e-3 * max(1.0, np.max(np.abs(want))), (name, what)


# ---- the d_rpb pass: host tables and binning --------------------------------------------------------

AXES = [  # (length, kernel_size, dilation, q_tile, kv_tile, region)
    (16, 5, 1, 4, 8, False), (16, 5, 1, 4, 8, True), (28, 7, 4, 8, 8, False), (28, 7, 4, 8, 8, True),
    (12, 5, 2, 4, 2, True), (19, 4, 2, 4, 8, False), (64, 13, 1, 16, 8, True), (9, 9, 1, 16, 16, False),
]


@pytest.mark.parametrize("axis", AXES, ids=lambda a: "L{}K{}d{}_q{}kv{}_{}".format(*a[:5], "region" if a[5] else "aligned"))
def test_delta_walk_visits_every_allowed_pair_once(axis):
    """Decoded from the packed tables, per dilation group: every allowed (real query, key) pair
    lies in exactly one visited (Q tile, KV tile or chunk) pair, filed under its offset
    ``ko - qo``, and a pair's no-mask flag is exact (brute force from the oracle's rule)."""
    length, kernel_size, dilation, q_tile, kv_tile, region = axis
    params = semantics.normalize_params((length,), kernel_size, 1, dilation, False)
    plan = planning.make_plan(params, (q_tile,), (kv_tile,), None, region)
    walk = bias_grad.delta_walk(plan)
    (deltas,), (offsets,), (width,) = walk.deltas, walk.offsets, walk.max_counts
    n = len(deltas)
    counts = walk.tables[offsets[0]:offsets[0] + dilation * n].reshape(dilation, n)
    entries = [walk.tables[o:o + dilation * n * width].reshape(dilation, n, width) for o in offsets[1:]]
    assert list(deltas) == sorted(set(deltas))
    for g in range(dilation):
        lg = semantics.group_length(g, length, dilation)
        allowed = {(x, y) for x in range(lg) for y in range(lg)
                   if oracle.axis_allowed(x, y, lg, kernel_size, 1, 1, False)}
        covered = []
        for d, delta in enumerate(deltas):
            for c in range(counts[g, d]):
                qt, ko, full = (int(e[g, d, c]) for e in entries)
                assert ko - qt * q_tile == delta and qt * q_tile < lg
                pairs = {(x, y) for x in range(qt * q_tile, min((qt + 1) * q_tile, lg))
                         for y in range(ko, ko + kv_tile)}
                assert bool(full) == (pairs <= allowed and ko + kv_tile <= lg), (g, qt, ko)
                covered += [p for p in pairs if p in allowed]
        assert sorted(covered) == sorted(allowed), g  # each allowed pair once


@pytest.mark.parametrize("axis", AXES, ids=lambda a: "L{}K{}d{}_q{}kv{}_{}".format(*a[:5], "region" if a[5] else "aligned"))
def test_class_blocks_hold_every_visited_pairs_bias(axis):
    """For every tile pair the forward visits (`bias_grad.delta_walk`'s lists, checked above),
    the block the kernels' lookup (`fused._class_bias`, emulated) finds holds the table entry
    of every allowed (query, key) pair at its relative offset."""
    length, kernel_size, dilation, q_tile, kv_tile, region = axis
    params = semantics.normalize_params((length,), kernel_size, 1, dilation, False)
    plan = planning.make_plan(params, (q_tile,), (kv_tile,), None, region)
    classes = bias_blocks.bias_classes(plan)
    table = np.random.default_rng(7).standard_normal((2, 2 * kernel_size - 1)).astype(np.float32)
    blocks = np.asarray(bias_blocks.blocks(jnp.asarray(table), classes, [kernel_size]))
    assert blocks.shape == (2, classes.num_classes, q_tile, kv_tile)
    walk = bias_grad.delta_walk(plan)
    (offsets,), (width,), n = walk.offsets, walk.max_counts, len(walk.deltas[0])
    counts = walk.tables[offsets[0]:offsets[0] + dilation * n].reshape(dilation, n)
    entries = [walk.tables[o:o + dilation * n * width].reshape(dilation, n, width) for o in offsets[1:3]]
    checked = 0
    for g in range(dilation):
        lg = semantics.group_length(g, length, dilation)
        for d in range(n):
            for c in range(counts[g, d]):
                qo, ko = int(entries[0][g, d, c]) * q_tile, int(entries[1][g, d, c])
                lookup = np.clip(ko - qo - classes.lut_lo[0], 0, classes.lut_sizes[0] - 1)
                block = blocks[:, classes.lut[classes.lut_offsets[0] + lookup]]
                assert classes.deltas[0][classes.lut[classes.lut_offsets[0] + lookup]] == ko - qo
                for i in range(q_tile):
                    for j in range(kv_tile):
                        x, y = qo + i, ko + j
                        if x < lg and y < lg and oracle.axis_allowed(x, y, lg, kernel_size, 1, 1, False):
                            np.testing.assert_array_equal(block[:, i, j], table[:, y - x + kernel_size - 1])
                            checked += 1
    assert checked > 0


def test_binning_equals_a_brute_force_scatter():
    """`_bin` (skew sums, placement by padding, chunks of first-axis offsets) equals adding every
    partial entry at its table index ``Delta_a + j_a - i_a + K_a - 1`` in float64."""
    rng = np.random.default_rng(0)
    kernel_size, q_tile, kv_tile, heads, bg = (4, 3), (4, 2), (2, 4), 3, 2
    deltas = ((-6, -2, 0, 2), (-4, 0, 4))
    st = types_static(kernel_size, q_tile, kv_tile, heads)
    partials = rng.standard_normal((4 * 3, bg, heads, 8, 8)).astype(np.float32)
    want = np.zeros((heads, 7, 5))
    p = partials.astype(np.float64).sum(1).reshape(4, 3, heads, 4, 2, 2, 4)
    for (d0, d1, h, i0, i1, j0, j1), value in np.ndenumerate(p):
        r0 = deltas[0][d0] + j0 - i0 + kernel_size[0] - 1
        r1 = deltas[1][d1] + j1 - i1 + kernel_size[1] - 1
        if 0 <= r0 < 7 and 0 <= r1 < 5:
            want[h, r0, r1] += value
    got = bias_grad._bin(jnp.asarray(partials), st, deltas)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    halves = [bias_grad._bin(jnp.asarray(partials[:6]), st, (deltas[0][:2], deltas[1])),
              bias_grad._bin(jnp.asarray(partials[6:]), st, (deltas[0][2:], deltas[1]))]
    np.testing.assert_allclose(np.asarray(halves[0] + halves[1]), want, rtol=1e-5, atol=1e-5)


def types_static(kernel_size, q_tile, kv_tile, heads):
    """A `fused._Static` for host-side helpers (plan of a map large enough for the tiles)."""
    params = semantics.normalize_params((16,) * len(kernel_size), kernel_size, 1, 1, False)
    plan = planning.make_plan(params, q_tile, kv_tile)
    return fused_triton._Static(plan, heads, heads, 16, 16, 1.0, jnp.dtype(jnp.float32),
                                TC(q_tile, kv_tile), True, fused_triton._Layout(False, plan), bias=True)


@pytest.mark.slow
def test_d_rpb_in_chunks_equals_one_launch(monkeypatch):
    """With a tiny partials budget every first-axis offset is its own launch; d_rpb is the same."""
    cfg, config, _ = LAYOUTS["permuted"]
    inp = make_inputs(cfg, jnp.float32, seed=3)
    rpb = _rpb(cfg, 3)
    problem = _problem(cfg, inp, rpb)
    grad = jax.jit(jax.grad(lambda b: fused_triton.attention(inp.q, inp.k, inp.v, problem, config, rpb=b)[0]
                            .astype(jnp.float32).sum()))
    whole = grad(rpb)
    monkeypatch.setattr(bias_grad, "PARTIALS_BUDGET_BYTES", 1)
    plan = planning.make_plan(problem.params, config.q_tile, config.kv_tile)
    assert len(bias_grad.delta_walk(plan).deltas[0]) > 1
    chunked = jax.jit(jax.grad(lambda b: fused_triton.attention(inp.q, inp.k, inp.v, problem, config, rpb=b)[0]
                               .astype(jnp.float32).sum()))(rpb)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["permuted-dilated-1d", "grouped-ragged",  # both batch mappings, fast tier
                                  pytest.param("permuted", marks=pytest.mark.slow),
                                  pytest.param("direct-region", marks=pytest.mark.slow)])
def test_d_rpb_with_batch_blocks(name, monkeypatch):
    """With every program summing a block of batch entries (`bias_grad.MIN_PROGRAMS` at 1: the
    blocks GPUs get on large grids), d_rpb equals the oracle's, and the one-entry programs' result
    up to float32 summation order."""
    cfg, config, _ = LAYOUTS[name]
    cfg = dataclasses.replace(cfg, batch=2)
    inp = make_inputs(cfg, jnp.float32, seed=6)
    rpb = _rpb(cfg, 6)
    problem = _problem(cfg, inp, rpb)

    def d_rpb():
        return jax.jit(jax.grad(lambda b: jnp.sum(
            fused_triton.attention(inp.q, inp.k, inp.v, problem, config, rpb=b)[0].astype(jnp.float32)
            * inp.dout)))(rpb)

    single = d_rpb()
    blocks = []
    real = bias_grad._batch_block
    monkeypatch.setattr(bias_grad, "MIN_PROGRAMS", 1)
    monkeypatch.setattr(bias_grad, "_batch_block", lambda *a: (blocks.append(real(*a)), blocks[-1])[1])
    blocked = d_rpb()
    assert blocks and min(blocks) > 1, blocks
    want = oracle.na_bwd(*(f64(x) for x in (inp.q, inp.k, inp.v, inp.dout)), np.zeros(inp.q.shape[:-1]),
                         **_window(cfg, rpb))[5]
    assert np.max(np.abs(f64(blocked) - want)) < 1e-3
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(single), rtol=1e-5, atol=1e-5)


def test_nonfinite_value_with_a_bias_stays_in_its_windows():
    """A NaN value: the containing forward kernel (which also adds the bias) keeps it in the
    windows that hold it; everywhere else the output equals the oracle's with the bias."""
    cfg, config, _ = LAYOUTS["grouped-ragged"]
    inp = make_inputs(cfg, jnp.float32, seed=4)
    rpb = _rpb(cfg, 4)
    v = inp.v.at[0, 3, 5, 0, 0].set(jnp.nan)
    problem = _problem(cfg, inp, rpb)
    out, _ = jax.jit(lambda q, k, v, b: fused_triton.attention(q, k, v, problem, config, rpb=b))(inp.q, inp.k, v, rpb)
    mask = oracle.na_mask(cfg.shape, cfg.kernel_size, 1, cfg.dilation)  # [N, N]
    sees = mask[:, np.ravel_multi_index((3, 5), cfg.shape)].reshape(cfg.shape)
    got = f64(out)[0]  # [*X, H, D_v]
    nan = np.isnan(got).any(-1)  # [*X, H] (the containing kernel poisons whole rows)
    group = cfg.heads // cfg.heads_kv  # the query heads of kv head 0 see it
    assert (nan[..., :group] == sees[..., None]).all() and not nan[..., group:].any()
    want, _ = oracle.na(f64(inp.q), f64(inp.k), f64(inp.v), **_window(cfg, rpb))
    assert np.max(np.abs(got[~nan] - want[0][~nan])) < 1e-4


def test_rpb_with_query_offsets_is_not_implemented():
    cfg, config, _ = LAYOUTS["direct"]
    inp = make_inputs(cfg, jnp.float32, seed=0)
    rpb = _rpb(cfg, 0)
    problem = _problem(cfg, inp, rpb)
    spans = (planning.AxisSpan(0, 8, 0, 16), None)
    with pytest.raises(NotImplementedError, match="rpb"):
        fused_triton.attention(inp.q[:, :8], inp.k, inp.v, problem, config, spans, rpb=rpb)


def test_rpb_kernels_lower_to_triton_for_cuda(monkeypatch):
    """Forward, dQ, dK/dV, d_rpb and tangent kernels with the bias lower to Triton IR for an
    sm90 GPU from this machine (`jax.export`): NAT with the region walk, DiNAT grouped, NAT
    permuted, and a 3-D map."""
    from jax import export

    from jna._src import compat

    monkeypatch.setattr(fused_triton, "_interpret", lambda: False)
    monkeypatch.setattr(bias_grad, "MIN_PROGRAMS", 1)  # the d_rpb kernel over blocks of batch entries
    spec = jax.ShapeDtypeStruct
    names = ("jna_fused_na_fwd", "jna_fused_na_fwd_contained", "jna_fused_na_dq", "jna_fused_na_dkv",
             "jna_fused_na_drpb", "jna_fused_na_tangent")
    for shape, kernel_size, dilation, fields in (((56, 56), 7, 1, dict(kv_region=True)), ((28, 28), 7, 4, {}),
                                                 ((56, 56), 7, 1, dict(direct_layout=False)),
                                                 ((8, 16, 16), 3, 1, {})):
        q = spec((2, *shape, 4, 32), jnp.bfloat16)
        rpb = spec((4, *(2 * kernel_size - 1,) * len(shape)), jnp.float32)
        zeros = jnp.zeros(q.shape, q.dtype)
        problem = check_call(zeros, zeros, zeros, kernel_size, 1, dilation, False, None, None, None, None,
                             rpb=jnp.zeros(rpb.shape))
        config = dataclasses.replace(fused_triton.default_config(problem), **fields)
        attn = lambda q, k, v, b, problem=problem, config=config: fused_triton.attention(q, k, v, problem, config,
                                                                                         rpb=b)

        def loss(q, k, v, b, attn=attn):
            out, lse = attn(q, k, v, b)
            return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

        def tangent(q, k, v, b, attn=attn):
            return jax.jvp(attn, (q, k, v, b), (q, k, v, b))[1]

        triton = "__gpu$xla.gpu.triton"
        with compat.triton_lowering_for_cuda(90):
            texts = [export.export(jax.jit(f), platforms=["cuda"],
                                   disabled_checks=[export.DisabledSafetyCheck.custom_call(triton)])(
                q, q, q, rpb).mlir_module() for f in (jax.grad(loss, argnums=(0, 1, 2, 3)), tangent)]
        for name in names:
            assert any(f'name = "{name}"' in t for t in texts), (shape, name)


# ---- on a GPU -------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("shape,kernel_size,dilation,heads_kv", [((56, 56), 7, 1, 4), ((28, 28), 7, 4, 2),
                                                                 ((14, 14), 7, 2, 4), ((8, 16, 16), 3, 1, 1),
                                                                 ((512,), 65, 1, 2)])
def test_half_precision_and_deterministic_d_rpb_on_gpu(shape, kernel_size, dilation, heads_kv, dtype,
                                                       monkeypatch):
    """NAT/DiNAT-like layers (and a 1-D window of 65), head dim 32, half precision: out, dq, dk,
    dv and d_rpb against the float64 oracle (relative L2 <= 1e-2 / 2e-2) for the default config
    and its layout variants (permuted, key-region walk); then five runs of the gradient are
    bitwise equal. The float16 cases run the d_rpb programs over blocks of batch entries
    (`bias_grad.MIN_PROGRAMS` at 1; these grids are too small to get them otherwise)."""
    if dtype == jnp.float16:
        monkeypatch.setattr(bias_grad, "MIN_PROGRAMS", 1)
    rank = len(shape)
    cfg = Config(shape, (kernel_size,) * rank, (1,) * rank, (dilation,) * rank, (False,) * rank, batch=2,
                 heads=4, heads_kv=heads_kv, dim=32, dim_v=32)
    inp = make_inputs(cfg, dtype, seed=11)
    rpb = _rpb(cfg, 11)  # float32 (as the Flax layers pass it)
    problem = _problem(cfg, inp, rpb)
    q64, k64, v64 = (f64(x) for x in (inp.q, inp.k, inp.v))
    want_out, _ = oracle.na(q64, k64, v64, **_window(cfg, rpb))
    want = oracle.na_bwd(q64, k64, v64, f64(inp.dout), np.zeros(want_out.shape[:-1]), **_window(cfg, rpb))
    want = (*want[:3], want[5])
    default = fused_triton.default_config(problem)
    configs = [default, dataclasses.replace(default, direct_layout=False)]
    region = dataclasses.replace(default, kv_region=True)
    if fused_triton.region_applies(problem, region):
        configs.append(region)
    for config in dict.fromkeys(configs):
        def grads(q, k, v, b, config=config):
            out, vjp = jax.vjp(lambda q, k, v, b: fused_triton.attention(q, k, v, problem, config, rpb=b)[0],
                               q, k, v, b)
            return out, vjp(inp.dout)

        run = jax.jit(grads)
        out, got = run(inp.q, inp.k, inp.v, rpb)
        assert oracle.rel_l2(f64(out), want_out) < 1e-2, config
        for g, w, what in zip(got, want, ("dq", "dk", "dv", "d_rpb")):
            assert oracle.rel_l2(f64(g), w) < 2e-2, (config, what)
        first = [np.asarray(x) for x in jax.tree_util.tree_leaves((out, got))]
        for _ in range(4):
            again = [np.asarray(x) for x in jax.tree_util.tree_leaves(run(inp.q, inp.k, inp.v, rpb))]
            for a, b in zip(first, again):
                assert np.array_equal(a, b), config
