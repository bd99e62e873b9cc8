"""Query offsets (issue 17): fused-triton computes some queries of a larger problem over a slab
of its keys (`jna._src.plan.AxisSpan`), the per-shard computation of spatial sharding's
"offset" route, in interpret mode against the float64 oracle.

A shard's queries are global rows ``[q0, q0 + n)`` of one axis; its keys the halo-extended rows
``[k0, k0 + m)`` (`jna.sharding.halo`). The oracle runs the whole problem: the shard's output and
lse are its rows; for the backward, the oracle's gradients with the cotangents of every other
query set to zero give the shard's dq (its rows) and the slab's dk/dv (the slab's rows; keys
outside the slab must receive nothing).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jna import semantics
from jna import sharding as js
from jna._src import plan as planning
from jna._src.arguments import check_call
from jna.backends.triton import fused as fused_triton
from jna_tests import oracle
from jna_tests.common import Config, f64, make_inputs

CASES = {
    # name: (config, sharded axis, shards)
    "1d-dilated-causal": (Config((48,), (5,), (1,), (2,), (True,), heads=2, heads_kv=1, dim=16, dim_v=16), 0, 4),
    "1d-strided": (Config((64,), (9,), (3,), (1,), (False,), heads=2, heads_kv=2, dim=16, dim_v=32), 0, 4),
    "2d-axis1-dilated": (Config((12, 24), (3, 5), (1, 2), (1, 2), (False, False), heads=2, heads_kv=1,
                                dim=16, dim_v=16), 1, 3),
    "3d-axis0-causal": (Config((16, 6, 8), (5, 3, 3), (1, 1, 1), (1, 1, 1), (True, False, False), heads=1,
                               heads_kv=1, dim=16, dim_v=16), 0, 2),
}


def _spans(params: semantics.NAParams, dim: int, shards: int):
    """Per shard: the span of its own rows and its halo-extended keys on axis ``dim``; the key
    slab is widened to multiples of the dilation (the plan's requirement)."""
    h = js.halo(params, shards, dim)
    d = params.dilation[dim]
    out = []
    for i in range(shards):
        a, b = i * h.shard_size, (i + 1) * h.shard_size
        k0 = max(0, ((a - h.left) // d) * d)
        k1 = min(h.length, b + h.right)
        spans = [None] * params.rank
        spans[dim] = planning.AxisSpan(a, b - a, k0, k1 - k0)
        out.append(tuple(spans))
    return out


def _cut(x, dim, start, size):
    return jax.lax.slice_in_dim(x, start, start + size, axis=1 + dim)


@pytest.mark.parametrize("name", sorted(CASES))
def test_plan_spans_cover_the_global_windows(name):
    """Each shard's plan visits every allowed pair of its queries exactly once: the useful pairs
    of the shards add up to the whole axis', with the same tiles."""
    cfg, dim, shards = CASES[name]
    params = semantics.normalize_params(cfg.shape, cfg.kernel_size, cfg.stride, cfg.dilation, cfg.is_causal)
    tiles = (8,) * params.rank
    whole = planning.make_plan(params, tiles, tiles)
    per_shard = [planning.make_plan(params, tiles, tiles, s) for s in _spans(params, dim, shards)]
    assert sum(p.axes[dim].useful_pairs for p in per_shard) == whole.axes[dim].useful_pairs
    assert all(p.has_spans for p in per_shard)


def test_spans_that_miss_keys_or_break_the_dilation_phase_are_errors():
    params = semantics.normalize_params((32,), (5,), (1,), (2,), (False,))
    with pytest.raises(ValueError, match="multiples of the dilation"):
        planning.make_plan(params, (8,), (8,), (planning.AxisSpan(8, 8, 3, 20),))
    with pytest.raises(ValueError, match="outside its key rows"):
        planning.make_plan(params, (8,), (8,), (planning.AxisSpan(8, 8, 8, 8),))
    q = jnp.zeros((1, 8, 1, 16))
    problem = check_call(jnp.zeros((1, 32, 1, 16)), *(jnp.zeros((1, 32, 1, 16)),) * 2, 5, 1, 2, False,
                         None, None, None, None)
    with pytest.raises(ValueError, match="does not match"):  # k not the span's key rows
        fused_triton.attention(q, q, q, problem, spans=(planning.AxisSpan(8, 8, 4, 16),))


# `make test` keeps one case (1-D dilated causal; test_sharding's fast fused-triton group runs the 1-D
# offset route end to end); all four in the slow tier.
SLOW_OFFSET_CASES = ("1d-strided", "3d-axis0-causal", "2d-axis1-dilated")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_OFFSET_CASES else n
                                  for n in sorted(CASES)])
def test_fused_triton_with_query_offsets_matches_the_oracle(name):
    cfg, dim, shards = CASES[name]
    inp = make_inputs(cfg, jnp.float32, seed=51)
    problem = check_call(inp.q, inp.k, inp.v, cfg.kernel_size, cfg.stride, cfg.dilation, cfg.is_causal,
                         None, None, None, None)
    q64, k64, v64 = (f64(x) for x in (inp.q, inp.k, inp.v))
    want_out, want_lse = oracle.na(q64, k64, v64, **cfg.na_kwargs())
    for i, spans in enumerate(_spans(problem.params, dim, shards)):
        span = spans[dim]
        q = _cut(inp.q, dim, span.q_start, span.q_len)
        k, v = (_cut(x, dim, span.kv_start, span.kv_len) for x in (inp.k, inp.v))
        dout = _cut(inp.dout, dim, span.q_start, span.q_len)
        dlse = _cut(inp.dlse, dim, span.q_start, span.q_len)

        def f(q, k, v):
            return fused_triton.attention(q, k, v, problem, spans=spans)

        (out, lse), vjp = jax.vjp(f, q, k, v)
        dq, dk, dv = vjp((dout, dlse))
        rows = lambda x, s, n: np.take(x, np.arange(s, s + n), axis=1 + dim)
        assert oracle.rel_l2(f64(out), rows(want_out, span.q_start, span.q_len)) < 1e-5, (name, i)
        assert np.max(np.abs(f64(lse) - rows(want_lse, span.q_start, span.q_len))) < 1e-4, (name, i)

        # Oracle gradients with only this shard's queries carrying cotangents.
        mask = np.zeros(cfg.shape, bool)
        index = [slice(None)] * len(cfg.shape)
        index[dim] = slice(span.q_start, span.q_start + span.q_len)
        mask[tuple(index)] = True
        full_dout = np.where(mask[None, ..., None, None], f64(inp.dout), 0.0)
        full_dlse = np.where(mask[None, ..., None], f64(inp.dlse), 0.0)
        gq, gk, gv = oracle.na_bwd(q64, k64, v64, full_dout, full_dlse, **cfg.na_kwargs())[:3]
        assert oracle.rel_l2(f64(dq), rows(gq, span.q_start, span.q_len)) < 1e-4, (name, i, "dq")
        for got, want, what in ((dk, gk, "dk"), (dv, gv, "dv")):
            assert oracle.rel_l2(f64(got), rows(want, span.kv_start, span.kv_len)) < 1e-4, (name, i, what)
            outside = np.delete(want, np.arange(span.kv_start, span.kv_start + span.kv_len), axis=1 + dim)
            assert np.all(outside == 0), (name, i, what, "keys outside the slab got gradient")


def test_kernels_with_query_offsets_lower_to_triton_for_cuda(monkeypatch):
    """A shard's forward and backward kernels (static origins in the windows) lower to Triton IR
    for an sm90 GPU from this machine (`jax.export`), as the unsharded ones do."""
    from jax import export

    from jna._src import compat

    monkeypatch.setattr(fused_triton, "_interpret", lambda: False)
    cfg, dim, shards = CASES["2d-axis1-dilated"]
    params = semantics.normalize_params(cfg.shape, cfg.kernel_size, cfg.stride, cfg.dilation, cfg.is_causal)
    spans = _spans(params, dim, shards)[1]
    span = spans[dim]
    q_shape, kv_shape = list(cfg.shape), list(cfg.shape)
    q_shape[dim], kv_shape[dim] = span.q_len, span.kv_len
    spec = jax.ShapeDtypeStruct
    q = spec((1, *q_shape, cfg.heads, cfg.dim), jnp.bfloat16)
    k = spec((1, *kv_shape, cfg.heads_kv, cfg.dim), jnp.bfloat16)
    full = jnp.zeros((1, *cfg.shape, cfg.heads, cfg.dim), jnp.bfloat16)
    problem = check_call(full, full[..., :1, :], full[..., :1, :], cfg.kernel_size, cfg.stride, cfg.dilation,
                         cfg.is_causal, None, None, None, None)

    def loss(q, k, v):
        out, lse = fused_triton.attention(q, k, v, problem, spans=spans)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

    triton = "__gpu$xla.gpu.triton"
    with compat.triton_lowering_for_cuda(90):
        text = export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["cuda"],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call(triton)])(
            q, k, k).mlir_module()
    for name in ("jna_fused_na_fwd", "jna_fused_na_dq", "jna_fused_na_dkv"):
        assert f'name = "{name}"' in text, name
