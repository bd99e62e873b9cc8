"""jna in a process with ``jax_enable_x64`` on (common in scientific JAX code).

With x64 on, Python scalars and numpy integers are 64-bit in JAX: a kernel that mixed them
with its float32/int32 values got float64 cond branches and loop carries, or int64 operands of
`jax.lax` ops, and failed to trace. Here every backend, the unfused ops (with relative
positional bias) and `jna.merge_attentions` run with x64 on for float32, float16 and bfloat16
inputs, forward and backward, against the float64 oracle at the suite's tolerances (float32:
1e-4 abs for out/lse and logits, 1e-3 abs for gradients; half types: relative L2 1e-2), and
keep their dtypes (outputs in the input dtype, lse and logits float32). `jna.sharding` runs
one forward on a mesh of one device.

fused-mosaic (Hopper only) is lowered for the GPU here, forward and backward, with x64 on, and
one tiny 1-D GQA case runs forward and backward in the Mosaic GPU simulator in a subprocess
started with ``JAX_ENABLE_X64=1`` (see `jna_tests.test_fused_mosaic_sim` for why a subprocess).

x64 is switched on for the tests of this file only and restored after each (pytest-xdist runs
other files' tests in the same worker processes).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jna
from jna_tests import oracle
from jna_tests.backends import BACKENDS, active_backends
from jna_tests.common import (
    Config, assert_abs, assert_rel_l2, f64, make_inputs, oracle_bwd, oracle_fwd, run_na,
)

DTYPES = {"f32": jnp.float32, "f16": jnp.float16, "bf16": jnp.bfloat16}
RTOL = 1e-2  # half types: relative L2 (the suite's half-type tolerance, jna_tests/backends.py)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def x64():
    """``jax_enable_x64`` on for one test, then back to what it was."""
    before = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", before)


def _check(got, want, dtype, atol, what, info):
    if dtype == jnp.float32:
        assert_abs(got, want, atol, what, info)
    else:
        assert_rel_l2(got, want, RTOL, what, info)


def test_x64_is_on():
    assert jnp.asarray(1.0).dtype == jnp.float64  # the fixture works


# ------------------------------------------------------------------------------------------
# Fused attention: every backend, forward and backward
# ------------------------------------------------------------------------------------------


def _attention_cases():
    for backend in active_backends():
        for name, dtype in DTYPES.items():
            if dtype in BACKENDS[backend].dtypes:
                yield pytest.param(backend, dtype, id=f"{backend}-{name}")


@pytest.mark.parametrize("backend,dtype", list(_attention_cases()))
def test_attention(backend, dtype):
    """Out, lse and the gradients of q, k, v and the additional keys/values (random cotangents
    of out and lse) vs the oracle: a 2-D GQA problem, one axis causal and strided (partial and
    full tile pairs), two additional keys (merged through `jna.merge_attentions`)."""
    dim = 32 if backend == "fused-mosaic" else 8  # fused-mosaic takes D in {32, 64, 128}
    extra = 2 if BACKENDS[backend].additional_kv else 0
    cfg = Config((6, 7), (3, 3), (1, 2), (1, 1), (False, True), heads=2, heads_kv=1, dim=dim,
                 dim_v=dim, n_extra=extra)
    inp = make_inputs(cfg, dtype, seed=11)
    out, lse, grads = run_na(cfg, inp, backend, grads=True)
    info = f"{backend} {cfg.short()} {jnp.dtype(dtype).name} x64"
    assert out.dtype == dtype and lse.dtype == jnp.float32, (out.dtype, lse.dtype, info)
    want_out, want_lse = oracle_fwd(cfg, inp)
    _check(out, want_out, dtype, 1e-4, "out", info)
    _check(lse, want_lse, dtype, 1e-4, "lse", info)
    names = ("dq", "dk", "dv", "d_extra_k", "d_extra_v")
    inputs = (inp.q, inp.k, inp.v, inp.extra_k, inp.extra_v)
    for name, g, w, x in zip(names, grads, oracle_bwd(cfg, inp), inputs):
        if x is None:
            continue
        assert g.dtype == x.dtype, (name, g.dtype, info)
        _check(g, w, dtype, 1e-3, name, info)


# ------------------------------------------------------------------------------------------
# Unfused ops: na2d_qk (with rpb) and na2d_av
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_unfused_ops(dtype):
    """Logits with relative positional bias and their gradients (q, k, rpb), the weighted sum
    and its gradients (attn, v), on a dilated 2-D GQA problem."""
    shape, ks, dil, heads, heads_kv, dim = (6, 7), (3, 3), (1, 2), 2, 1, 8
    window = dict(kernel_size=ks, dilation=dil)
    kk = math.prod(ks)
    rng = np.random.default_rng(12)
    arr = lambda *s: jnp.asarray(rng.standard_normal(s, dtype=np.float32))
    q = arr(1, *shape, heads, dim).astype(dtype)
    k = arr(1, *shape, heads_kv, dim).astype(dtype)
    v = arr(1, *shape, heads_kv, dim).astype(dtype)
    rpb = 0.5 * arr(heads, *(2 * a - 1 for a in ks))
    attn = jax.nn.softmax(arr(1, *shape, heads, kk), axis=-1)
    dlogits, dout = arr(1, *shape, heads, kk), arr(1, *shape, heads, dim)

    @jax.jit
    def ours(q, k, v, rpb, attn, dlogits, dout):
        logits, qk_vjp = jax.vjp(lambda q, k, r: jna.na2d_qk(q, k, **window, rpb=r), q, k, rpb)
        out, av_vjp = jax.vjp(lambda a, v: jna.na2d_av(a, v, **window), attn, v)
        return logits, out, qk_vjp(dlogits), av_vjp(dout.astype(out.dtype))

    logits, out, (dq, dk, drpb), (dattn, dv) = ours(q, k, v, rpb, attn, dlogits, dout)
    info = f"unfused ops {jnp.dtype(dtype).name} x64"
    assert logits.dtype == jnp.float32 and out.dtype == dtype, (logits.dtype, out.dtype)
    assert (dq.dtype, dk.dtype, dv.dtype) == (dtype,) * 3 and drpb.dtype == rpb.dtype
    assert dattn.dtype == attn.dtype

    table = oracle.slot_table(shape, **window)
    index = oracle.rpb_table(shape, ks, dil)
    _check(logits, oracle.qk(f64(q), f64(k), table, None, f64(rpb), index), dtype, 1e-4,
           "logits", info)
    _check(out, oracle.av(f64(attn), f64(v), table), dtype, 1e-4, "av out", info)
    wq, wk, wrpb = oracle.qk_bwd(f64(q), f64(k), table, f64(dlogits), None, rpb.shape, index)
    wattn, wv = oracle.av_bwd(f64(attn), f64(v), table, f64(dout.astype(dtype)))
    for g, w, what in ((dq, wq, "dq"), (dk, wk, "dk"), (drpb, wrpb, "drpb"),
                       (dattn, wattn, "dattn"), (dv, wv, "dv")):
        _check(g, w, dtype, 1e-3, what, info)


# ------------------------------------------------------------------------------------------
# merge_attentions
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_merge_attentions(dtype):
    """Two partial attentions (plain jax, float32) over disjoint key sets, cast to ``dtype`` and
    merged: out and lse equal the oracle's attention over the union, and the gradients through
    the merge into q and both parts' k/v equal the oracle's backward over the union."""
    b, x, h, h_kv, d, sizes = 1, (3, 4), 2, 1, 8, (5, 4)
    rng = np.random.default_rng(13)
    arr = lambda *s: jnp.asarray(rng.standard_normal(s, dtype=np.float32))
    q = arr(b, *x, h, d).astype(dtype)
    ks = [arr(b, n, h_kv, d).astype(dtype) for n in sizes]
    vs = [arr(b, n, h_kv, d).astype(dtype) for n in sizes]
    dout, dlse = arr(b, *x, h, d), arr(b, *x, h)

    def part(q, k, v):
        g = h // h_kv
        q32, k32, v32 = (a.astype(jnp.float32) for a in (q, k, v))
        kr, vr = jnp.repeat(k32, g, axis=2), jnp.repeat(v32, g, axis=2)
        s = jnp.einsum("bxyhd,bmhd->bxyhm", q32, kr, precision="highest") * d ** -0.5
        lse = jax.nn.logsumexp(s, axis=-1)
        out = jnp.einsum("bxyhm,bmhd->bxyhd", jnp.exp(s - lse[..., None]), vr, precision="highest")
        return out.astype(dtype), lse

    def merged(q, ks, vs):
        parts = [part(q, k, v) for k, v in zip(ks, vs)]
        return jna.merge_attentions([p[0] for p in parts], [p[1] for p in parts])

    @jax.jit
    def run(q, ks, vs, dout, dlse):
        (out, lse), vjp = jax.vjp(merged, q, ks, vs)
        return out, lse, vjp((dout.astype(dtype), dlse))

    out, lse, (dq, dks, dvs) = run(q, ks, vs, dout, dlse)
    assert out.dtype == dtype and lse.dtype == jnp.float32, (out.dtype, lse.dtype)
    assert dq.dtype == dtype and all(g.dtype == dtype for g in (*dks, *dvs))

    k_all = np.concatenate([f64(a) for a in ks], 1)
    v_all = np.concatenate([f64(a) for a in vs], 1)
    mask = np.ones((math.prod(x), k_all.shape[1]), bool)
    want_out, want_lse = oracle.attention(f64(q), k_all, v_all, mask)
    info = f"merge {jnp.dtype(dtype).name} x64"
    _check(out, want_out, dtype, 1e-4, "merged out", info)
    _check(lse, want_lse, dtype, 1e-4, "merged lse", info)
    w_dq, w_dk, w_dv, _, _ = oracle.attention_bwd(f64(q), k_all, v_all, mask,
                                                  f64(dout.astype(dtype)), f64(dlse))
    _check(dq, w_dq, dtype, 1e-3, "dq", info)
    bounds = np.cumsum((0,) + sizes)
    for i, (g_k, g_v) in enumerate(zip(dks, dvs)):
        sl = slice(bounds[i], bounds[i + 1])
        _check(g_k, w_dk[:, sl], dtype, 1e-3, f"dk[{i}]", info)
        _check(g_v, w_dv[:, sl], dtype, 1e-3, f"dv[{i}]", info)


# ------------------------------------------------------------------------------------------
# jna.sharding on a mesh of one device
# ------------------------------------------------------------------------------------------


def test_sharding_one_device():
    """`jna.sharding.na2d` (batch and spatial axes, the offset route of the reference backend)
    on a mesh of one device, forward, vs the oracle."""
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "sp"))
    cfg = Config((6, 7), (3, 3), (1, 1), (1, 2), (False, False), heads=2, heads_kv=1)
    inp = make_inputs(cfg, jnp.float32, seed=15)
    out, lse = jna.sharding.na2d(inp.q, inp.k, inp.v, **cfg.na_kwargs(), return_lse=True,
                                 backend="reference", mesh=mesh, batch_axis="data",
                                 spatial_axis="sp")
    assert out.dtype == jnp.float32 and lse.dtype == jnp.float32
    want_out, want_lse = oracle_fwd(cfg, inp)
    assert_abs(out, want_out, 1e-4, "sharded out", cfg.short())
    assert_abs(lse, want_lse, 1e-4, "sharded lse", cfg.short())


# ------------------------------------------------------------------------------------------
# fused-mosaic: GPU lowering here, one tiny simulated case in a subprocess
# ------------------------------------------------------------------------------------------


def _mosaic_problem(shape, kernel_size, stride, dilation, is_causal, heads, kv_heads, dim,
                    dtype=jnp.bfloat16):
    from jna import semantics
    from jna._src.arguments import NAProblem

    params = semantics.normalize_params(shape, kernel_size, stride, dilation, is_causal)
    return NAProblem(params, 1, heads, kv_heads, dim, dim, jnp.dtype(dtype), dim ** -0.5, 0)


@pytest.mark.parametrize("variant", ["default-gqa", "direct-persistent", "rpb-dilated-gqa"])
def test_fused_mosaic_lowers_for_gpu(variant):
    """The GPU kernels (forward, dQ, dK/dV) lower for CUDA with x64 on: a 2-D GQA problem with
    stride, dilation and a causal axis at its default config; the direct-layout persistent
    forward on a problem the tiles divide; a relative positional bias (its blocks' loads and the
    d_rpb kernel) on a dilated GQA problem."""
    from jna.backends.mosaic import op as fused_mosaic

    rpb = variant.startswith("rpb")
    if variant == "default-gqa":
        problem = _mosaic_problem((20, 24), (5, 7), (1, 3), (2, 1), (False, True), 4, 2, 64)
        config = None
    elif rpb:
        problem = _mosaic_problem((20, 24), (5, 7), 1, (2, 1), False, 4, 2, 64)
        config = fused_mosaic.MosaicConfig((8, 16), (8, 8), 2)
    else:
        problem = _mosaic_problem((16, 48), (7, 9), (1, 2), (1, 1), (True, False), 2, 1, 64,
                                  jnp.float16)
        config = fused_mosaic.MosaicConfig((4, 16), (4, 16), 2, direct_layout=True,
                                           persistent=True)
    text = fused_mosaic.lower_for_gpu(problem, config, backward=True, rpb=rpb).as_text()
    assert text.count("mosaic_gpu") >= 3 + rpb


SIM_CFG = Config((64,), (9,), (2,), (1,), (True,), heads=2, heads_kv=1, dim=64, dim_v=64)


def _simulate() -> dict:
    """The tiny simulated case (in the subprocess): errors vs the oracle and the reference."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from jna._src.arguments import check_call
    from jna.backends.mosaic import op as fused_mosaic

    cfg = SIM_CFG
    inp = make_inputs(cfg, jnp.bfloat16, seed=14)
    problem = check_call(inp.q, inp.k, inp.v, cfg.kernel_size, cfg.stride, cfg.dilation,
                         cfg.is_causal, None, None, None, None)
    config = fused_mosaic.MosaicConfig((64,), (64,), 2)
    sim = plgpu.InterpretGPUParams()
    (out, lse), vjp = jax.vjp(lambda q, k, v: fused_mosaic._run(q, k, v, problem, config, sim),
                              inp.q, inp.k, inp.v)
    grads = vjp((inp.dout.astype(out.dtype), inp.dlse))
    up = lambda a: a.astype(jnp.float32)
    r_out, r_lse = jna.neighborhood_attention(up(inp.q), up(inp.k), up(inp.v), **cfg.na_kwargs(),
                                              return_lse=True, backend="reference")
    o_out, o_lse = oracle_fwd(cfg, inp)
    o_grads = oracle_bwd(cfg, inp)[:3]
    err = lambda e: float(e) if np.isfinite(e) else float("inf")
    return dict(
        x64=bool(jax.config.jax_enable_x64),
        dtypes=[jnp.dtype(a.dtype).name for a in (out, lse, *grads)],
        out_rel_l2=err(oracle.rel_l2(f64(out), o_out)),
        ref_out_rel_l2=err(oracle.rel_l2(f64(out), f64(r_out))),
        lse_abs=err(np.max(np.abs(f64(lse) - o_lse))),
        ref_lse_abs=err(np.max(np.abs(f64(lse) - f64(r_lse)))),
        grad_rel_l2=[err(oracle.rel_l2(f64(g), w)) for g, w in zip(grads, o_grads)],
    )


@pytest.mark.slow  # ~8 s; the x64 lowering checks of fused-mosaic stay in `make test`
def test_fused_mosaic_simulated_forward_backward():
    """A tiny 1-D GQA case (causal, strided, bf16, D=64) in the Mosaic GPU simulator with x64
    on: out, lse and dq/dk/dv vs the oracle and the reference backend."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_ENABLE_X64="1",
               NPROC=os.environ.get("JNA_SIM_NPROC", "8"),
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-m", "jna_tests.test_x64"], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert rows, f"simulation subprocess failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    r = rows[-1]
    assert r["x64"], "the subprocess did not run with x64 on"
    assert r["dtypes"] == ["bfloat16", "float32", "bfloat16", "bfloat16", "bfloat16"], r
    assert r["out_rel_l2"] <= RTOL and r["ref_out_rel_l2"] <= RTOL, r
    assert r["lse_abs"] <= 2e-2 and r["ref_lse_abs"] <= 2e-2, r
    assert all(e <= RTOL for e in r["grad_rel_l2"]), r


if __name__ == "__main__":  # the simulation subprocess (started with JAX_ENABLE_X64=1)
    print(json.dumps(_simulate()), flush=True)


# ------------------------------------------------------------------------------------------
# Flax modules (linen and NNX), with and without relative positional bias
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,rel_pos_bias", [
    (jnp.float32, False), pytest.param(jnp.float16, False, marks=pytest.mark.slow), (jnp.bfloat16, False),
    (jnp.bfloat16, True)],
    ids=["f32", "f16", "bf16", "bf16-rpb"])  # rpb's ops run every dtype in test_unfused_ops
def test_modules(dtype, rel_pos_bias):
    """The linen and NNX layers (computing in the input dtype) keep it under x64, agree with each
    other exactly and, for half types, with the float32 layer on the same weights."""
    from flax import nnx

    x32 = jax.random.normal(jax.random.key(0), (2, 6, 7, 16), jnp.float32)
    x = x32.astype(dtype)
    kwargs = dict(num_heads=2, kernel_size=3, dilation=(1, 2), rel_pos_bias=rel_pos_bias,
                  backend="reference")  # the backends are covered above; rpb too (test_rpb.py)
    linen = jna.NeighborhoodAttention2D(**kwargs, dtype=dtype)
    variables = linen.init(jax.random.key(1), x)
    y = linen.apply(variables, x)
    assert y.dtype == dtype and bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
    layer = jna.nnx.NeighborhoodAttention2D(in_features=16, **kwargs, dtype=dtype, rngs=nnx.Rngs(0))
    for name in ("qkv", "proj"):
        getattr(layer, name).kernel[...] = variables["params"][name]["kernel"]
        getattr(layer, name).bias[...] = variables["params"][name]["bias"]
    if rel_pos_bias:
        layer.rpb[...] = variables["params"]["rpb"]
    np.testing.assert_array_equal(np.asarray(layer(x).astype(jnp.float32)),
                                  np.asarray(y.astype(jnp.float32)))
    grads = jax.grad(lambda v: linen.apply(v, x).astype(jnp.float32).sum())(variables)
    assert all(g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g)))
               for g in jax.tree.leaves(grads))
    if dtype != jnp.float32:
        want = jna.NeighborhoodAttention2D(**kwargs).apply(variables, x32)
        assert_rel_l2(y, f64(want), RTOL, f"module {jnp.dtype(dtype).name} vs float32", kwargs)


# ------------------------------------------------------------------------------------------
# fused-triton's in-place layouts (the public-API case above takes the permuted one)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["grouped-region", pytest.param("grouped-ragged", marks=pytest.mark.slow),
                                  pytest.param("direct-region", marks=pytest.mark.slow)])
def test_fused_triton_in_place_layouts(name):
    """The grouped layout (ragged groups, masked stores) and the key-region walk with a relative
    positional bias, float32, with x64 on: out, lse and the gradients of q, k, v and rpb against
    the float64 oracle (the grouped layout's stores mixed int32 tile starts with int64 Python
    starts there, and failed to trace)."""
    from jna.backends.triton import fused as fused_triton
    from jna_tests import test_rpb_fused as rpb_cases

    cfg, config, layout = rpb_cases.LAYOUTS[name]
    inp = make_inputs(cfg, jnp.float32, seed=13)
    rpb = rpb_cases._rpb(cfg, 13)
    problem = rpb_cases._problem(cfg, inp, rpb)
    f = lambda q, k, v, b: fused_triton.attention(q, k, v, problem, config, rpb=b)
    (out, lse), vjp = jax.vjp(f, inp.q, inp.k, inp.v, rpb)
    assert out.dtype == jnp.float32 and lse.dtype == jnp.float32
    q64, k64, v64 = (f64(x) for x in (inp.q, inp.k, inp.v))
    window = rpb_cases._window(cfg, rpb)
    want_out, want_lse = oracle.na(q64, k64, v64, **window)
    want = oracle.na_bwd(q64, k64, v64, f64(inp.dout), f64(inp.dlse), **window)
    assert_abs(out, want_out, 1e-4, "out", name)
    assert_abs(lse, want_lse, 1e-4, "lse", name)
    for got, w, what in zip(vjp((inp.dout, inp.dlse)), (*want[:3], want[5]), ("dq", "dk", "dv", "d_rpb")):
        assert got.dtype == jnp.float32, what
        assert_abs(got, w, 1e-3, what, name)
