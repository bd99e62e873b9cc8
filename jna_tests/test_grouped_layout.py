"""fused-triton's grouped layout (issue 16): dilation groups and ragged tiles read in place.

Where every axis is a multiple of its dilation, ``[B, *X, H, D]`` viewed as
``[B, Lg_1, d_1, ..., H, D]`` makes each dilation group a strided sub-array; the kernels load and
store their tiles there, masked where a tile runs past the group length, instead of permuting
q/k/v/out (and dout and the gradients) through XLA copies. These tests pin which calls take it
and check its forward, backward and forward mode against the float64 oracle, in interpret mode
on the CPU and on real kernels on a GPU; and that its kernels lower to Triton for sm90.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jna._src import plan as planning
from jna._src.arguments import check_call
from jna.backends.triton import fused as fused_triton
from jna_tests import oracle
from jna_tests.common import Config, f64, make_inputs

CASES = {
    # dinat-like: 2-D dilation, group length 6 under 8-row tiles (ragged on both axes), GQA
    "2d-dilated-ragged": Config((12, 12), (5, 5), (1, 1), (2, 2), (False, False), heads=4, heads_kv=2,
                                dim=16, dim_v=16),
    # ragged without dilation (NAT's 14x14 stage), strided on one axis, causal on the other
    "2d-ragged-strided-causal": Config((14, 10), (7, 3), (2, 1), (1, 1), (False, True), heads=2,
                                       heads_kv=1, dim=16, dim_v=32),
    "1d-dilated-causal": Config((30,), (5,), (1,), (3,), (True,), batch=2, heads=2, heads_kv=2, dim=32,
                                dim_v=16),
    "3d-mixed": Config((6, 8, 10), (3, 3, 5), (1, 2, 1), (2, 1, 1), (True, False, False), heads=2,
                       heads_kv=1, dim=16, dim_v=16),
}


def _problem(cfg: Config, inp):
    return check_call(inp.q, inp.k, inp.v, cfg.kernel_size, cfg.stride, cfg.dilation, cfg.is_causal,
                      cfg.scale, None, None, None)


def _layout(problem, config=None):
    """``"direct"``, ``"grouped"`` or ``"permuted"``: what `fused_triton.attention` takes."""
    config = config or fused_triton.default_config(problem)
    plan = planning.make_plan(problem.params, config.q_tile, config.kv_tile)
    dims = fused_triton._padded_dim(problem.head_dim), fused_triton._padded_dim(problem.value_dim)
    if fused_triton._direct_ok(problem, plan, *dims, config.direct_layout):
        return "direct"
    return "grouped" if fused_triton._grouped_ok(problem, plan, *dims, config.direct_layout) else "permuted"


def test_which_calls_take_the_grouped_layout():
    def layout(shape, dilation, dim=32):
        x = jnp.zeros((1, *shape, 2, dim), jnp.bfloat16)
        return _layout(check_call(x, x, x, 3, 1, dilation, False, None, None, None, None))

    assert layout((28, 28), (4, 4)) == "grouped"  # 2d-dinat: group length 7
    assert layout((14, 14), (1, 1)) == "grouped"  # ragged tiles, no dilation
    assert layout((64, 64), (1, 1)) == "direct"   # tiles divide the map: unchanged
    assert layout((30, 28), (4, 4)) == "permuted"  # 30 is not a multiple of the dilation
    assert layout((28, 28), (4, 4), dim=24) == "permuted"  # head dim padded to a power of two
    for cfg in CASES.values():
        inp = make_inputs(cfg, jnp.float32)
        assert _layout(_problem(cfg, inp)) == "grouped", cfg.short()


# One case in `make test` (interpret mode costs ~10 s each; its 10-minute budget), all of them in the slow tier and on the GPU.
FAST = ("2d-dilated-ragged",)


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in sorted(CASES)])
def test_grouped_layout_matches_the_oracle(name):
    """Forward (out, lse), backward (dq, dk, dv through both outputs) and forward mode against
    the float64 oracle; the permuted layout (the config's ``direct_layout=False``) on the same
    call agrees too."""
    cfg = CASES[name]
    inp = make_inputs(cfg, jnp.float32, seed=16)
    problem = _problem(cfg, inp)
    q64, k64, v64 = (f64(x) for x in (inp.q, inp.k, inp.v))
    want_out, want_lse = oracle.na(q64, k64, v64, **cfg.na_kwargs())
    want_grads = oracle.na_bwd(q64, k64, v64, f64(inp.dout), f64(inp.dlse), **cfg.na_kwargs())[:3]
    grouped = fused_triton.default_config(problem)
    permuted = dataclasses.replace(grouped, direct_layout=False)
    assert _layout(problem, grouped) == "grouped" and _layout(problem, permuted) == "permuted"
    for config in (grouped, permuted):
        f = lambda q, k, v: fused_triton.attention(q, k, v, problem, config)
        (out, lse), vjp = jax.vjp(f, inp.q, inp.k, inp.v)
        assert oracle.rel_l2(f64(out), want_out) < 1e-5, (name, config)
        assert np.max(np.abs(f64(lse) - want_lse)) < 1e-4, (name, config)
        for got, want, what in zip(vjp((inp.dout, inp.dlse)), want_grads, "qkv"):
            assert oracle.rel_l2(f64(got), want) < 1e-4, (name, config, "d" + what)
    # Forward mode (the tangent kernel reads the grouped layout too): central differences of
    # the oracle along the tangent.
    tangents = tuple(jnp.asarray(np.random.default_rng(3).standard_normal(x.shape), jnp.float32)
                     for x in (inp.q, inp.k, inp.v))
    _, (tout, tlse) = jax.jvp(lambda q, k, v: fused_triton.attention(q, k, v, problem, grouped),
                              (inp.q, inp.k, inp.v), tangents)
    eps = 1e-4
    plus = oracle.na(*(a + eps * f64(t) for a, t in zip((q64, k64, v64), tangents)), **cfg.na_kwargs())
    minus = oracle.na(*(a - eps * f64(t) for a, t in zip((q64, k64, v64), tangents)), **cfg.na_kwargs())
    assert oracle.rel_l2(f64(tout), (plus[0] - minus[0]) / (2 * eps)) < 1e-4, name
    assert oracle.rel_l2(f64(tlse), (plus[1] - minus[1]) / (2 * eps)) < 1e-4, name


def test_grouped_kernels_lower_to_triton_for_cuda(monkeypatch):
    """The grouped layout's masked tile loads and stores (forward, dQ, dK/dV, tangent) lower to
    Triton IR for an sm90 GPU from this machine (`jax.export`)."""
    from jax import export

    from jna._src import compat

    monkeypatch.setattr(fused_triton, "_interpret", lambda: False)
    spec = jax.ShapeDtypeStruct
    q = spec((2, 28, 28, 4, 32), jnp.bfloat16)
    k = spec((2, 28, 28, 2, 32), jnp.bfloat16)
    problem = check_call(jnp.zeros(q.shape, q.dtype), *(jnp.zeros(k.shape, k.dtype),) * 2, 7, 1, 4, False,
                         None, None, None, None)
    assert _layout(problem) == "grouped"

    def loss(q, k, v):
        out, lse = fused_triton.attention(q, k, v, problem)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

    def tangent(q, k, v):
        return jax.jvp(lambda q, k, v: fused_triton.attention(q, k, v, problem), (q, k, v), (q, k, v))[1]

    triton = "__gpu$xla.gpu.triton"
    texts = []
    with compat.triton_lowering_for_cuda(90):
        for f in (jax.grad(loss, argnums=(0, 1, 2)), tangent):
            texts.append(export.export(jax.jit(f), platforms=["cuda"],
                                       disabled_checks=[export.DisabledSafetyCheck.custom_call(triton)])(
                q, k, k).mlir_module())
    for name in ("jna_fused_na_fwd", "jna_fused_na_dq", "jna_fused_na_dkv", "jna_fused_na_tangent"):
        assert any(f'name = "{name}"' in t for t in texts), name
    # No permutation: the grouped operands are reshapes of the inputs, no transposes.
    assert "stablehlo.transpose" not in texts[0]
