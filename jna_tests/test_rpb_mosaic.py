"""Relative positional bias on the fused-mosaic kernels, on a Hopper GPU (marked ``gpu``).

`test_rpb.py` runs its cases on every backend with ``supports_rpb``, fused-mosaic included on a
Hopper GPU (in bf16/fp16, its dtypes). This file adds what is particular to fused-mosaic's bias
(the tile-offset class blocks of `jna._src.rpb_tiles` and the class-sum kernel
`jna.backends.mosaic.rpb_grad`), at shapes larger than the CPU simulator can run
(`test_fused_mosaic_sim.py` has the simulated cases):

* bf16/fp16 against the float64 oracle: out, lse, dq, dk, dv and d_rpb (relative L2 <= 1e-2),
  over 1-D/2-D/3-D, dilation, GQA, head dims 32-256, both backwards, the direct layout and the
  persistent forward, rpb in float32 and in the inputs' dtype;
* determinism: five runs of the same jitted gradient give bitwise equal dq, dk, dv and d_rpb;
* a bias held constant (not differentiated) gives the same dq/dk/dv bits;
* a non-finite value takes the containing path with the bias (queries away from it exact);
* forward mode with a bias raises NotImplementedError naming rpb.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jna
from jna import backends
from jna_tests import oracle
from jna_tests.common import Config, make_inputs, na_fn

pytestmark = [
    pytest.mark.gpu,  # the CPU test command deselects these (-m "not gpu")
    pytest.mark.skipif(jax.default_backend() != "gpu" or not backends.get("fused-mosaic").runs_natively(),
                       reason="fused-mosaic runs natively on a Hopper GPU only"),
]

RTOL = 1e-2


def _cfg(shape, kernel_size, dilation=1, **kw):
    rank = len(shape)
    per = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * rank
    return Config(tuple(shape), per(kernel_size), (1,) * rank, per(dilation), (False,) * rank, **kw)


# name: (config, dtype, rpb dtype (None: the inputs'), MosaicConfig fields (None: the default))
CASES = {
    "1d-gqa-d64": (_cfg((1000,), 33, heads=4, heads_kv=2, dim=64, dim_v=64, batch=2),
                   jnp.bfloat16, jnp.float32, None),
    "1d-d256-fp16": (_cfg((300,), 17, heads=2, heads_kv=1, dim=256, dim_v=256),
                     jnp.float16, None, None),
    "2d-nat-d32": (_cfg((28, 28), 7, heads=4, heads_kv=4, dim=32, dim_v=32, batch=2),
                   jnp.bfloat16, jnp.float32, None),
    "2d-dinat-d32": (_cfg((28, 28), 7, dilation=4, heads=2, heads_kv=2, dim=32, dim_v=32, batch=2),
                     jnp.bfloat16, None, None),
    "2d-nonsquare-dilated-d128-fused-bwd": (
        _cfg((40, 36), (13, 9), dilation=(1, 2), heads=4, heads_kv=2, dim=128, dim_v=128),
        jnp.float16, jnp.float32, dict(q_tile=(8, 16), kv_tile=(16, 8), num_stages=2, backward="fused")),
    "2d-direct-persistent-d128": (
        _cfg((32, 64), (9, 13), heads=4, heads_kv=4, dim=128, dim_v=128),
        jnp.bfloat16, jnp.float32,
        dict(q_tile=(8, 16), kv_tile=(8, 16), num_stages=2, direct_layout=True, persistent=True)),
    "3d-dilated-gqa-d64": (_cfg((8, 12, 16), (3, 5, 5), dilation=(1, 2, 1), heads=4, heads_kv=1,
                                dim=64, dim_v=64), jnp.bfloat16, jnp.float32, None),
    "2d-q128-kv64-3stages": (
        _cfg((32, 32), 11, heads=2, heads_kv=1, dim=128, dim_v=128, batch=3),
        jnp.bfloat16, jnp.bfloat16, dict(q_tile=(8, 16), kv_tile=(8, 8), num_stages=3)),
}


def _backend(fields):
    if fields is None:
        return "fused-mosaic"
    return backends.FusedMosaic(backends.MosaicConfig(**fields))


def _rpb(cfg, dtype, seed=0):
    rng = np.random.default_rng(100 + seed)
    shape = (cfg.heads, *(2 * k - 1 for k in cfg.kernel_size))
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32)).astype(dtype)


def _grad_fn(cfg, backend, wrt_rpb=True):
    """Jitted ``(out, lse, grads)`` of ``na*d(..., rpb=)`` for the cotangents ``dout``/``dlse``;
    ``grads``: dq, dk, dv and, with ``wrt_rpb``, d_rpb."""
    fn = na_fn(cfg.rank)

    def f(q, k, v, rpb):
        return fn(q, k, v, kernel_size=cfg.kernel_size, dilation=cfg.dilation, return_lse=True,
                  backend=backend, rpb=rpb)

    @jax.jit
    def run(q, k, v, rpb, dout, dlse):
        if wrt_rpb:
            (out, lse), vjp = jax.vjp(f, q, k, v, rpb)
        else:
            (out, lse), vjp = jax.vjp(lambda q, k, v: f(q, k, v, rpb), q, k, v)
        return out, lse, vjp((dout, dlse))

    return run


def f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


@pytest.mark.parametrize("name", list(CASES))
def test_against_oracle(name):
    cfg, dtype, rpb_dtype, fields = CASES[name]
    inp = make_inputs(cfg, dtype, seed=len(name))
    rpb = _rpb(cfg, rpb_dtype or dtype, len(name))
    out, lse, grads = _grad_fn(cfg, _backend(fields))(inp.q, inp.k, inp.v, rpb, inp.dout, inp.dlse)
    kwargs = dict(kernel_size=cfg.kernel_size, dilation=cfg.dilation, rpb=f64(rpb))
    want_out, want_lse = oracle.na(f64(inp.q), f64(inp.k), f64(inp.v), **kwargs)
    want = oracle.na_bwd(f64(inp.q), f64(inp.k), f64(inp.v), f64(inp.dout), f64(inp.dlse), **kwargs)
    want = (*want[:3], want[5])
    assert out.dtype == dtype and lse.dtype == jnp.float32
    errors = {"out": oracle.rel_l2(f64(out), want_out), "lse": oracle.rel_l2(f64(lse), want_lse)}
    for what, g, w, x in zip(("dq", "dk", "dv", "d_rpb"), grads, want, (inp.q, inp.k, inp.v, rpb)):
        assert g.dtype == x.dtype and g.shape == x.shape, (what, g.dtype, g.shape)
        errors[what] = oracle.rel_l2(f64(g), w)
    bad = {k: v for k, v in errors.items() if not v <= RTOL}
    assert not bad, f"{name}: relative L2 errors above {RTOL}: {bad} (all: {errors})"


@pytest.mark.parametrize("backward", ["split", "fused"])
def test_d_rpb_is_deterministic(backward):
    """Five runs of the same jitted gradient: bitwise equal dq, dk, dv and d_rpb (no atomics:
    the class sums are per-CTA loops in a fixed order, then fixed-order XLA sums and gathers)."""
    cfg = _cfg((48, 48), 7, heads=4, heads_kv=2, dim=128, dim_v=128, batch=4)
    inp = make_inputs(cfg, jnp.bfloat16, seed=11)
    rpb = _rpb(cfg, jnp.float32, 11)
    fields = dict(q_tile=(8, 16), kv_tile=(8, 16), num_stages=2, backward=backward)
    run = _grad_fn(cfg, _backend(fields))
    first = jax.device_get(run(inp.q, inp.k, inp.v, rpb, inp.dout, inp.dlse)[2])
    for _ in range(4):
        again = jax.device_get(run(inp.q, inp.k, inp.v, rpb, inp.dout, inp.dlse)[2])
        for what, a, b in zip(("dq", "dk", "dv", "d_rpb"), first, again):
            assert np.array_equal(np.asarray(a), np.asarray(b)), f"{what} differs between runs ({backward})"


def test_a_constant_bias_gives_the_same_gradients():
    """Differentiating in q, k, v only (the bias closed over) skips the d_rpb kernel and gives the
    same dq/dk/dv bits as differentiating in the bias too."""
    cfg = _cfg((24, 40), (7, 9), dilation=(2, 1), heads=2, heads_kv=1, dim=64, dim_v=64, batch=2)
    inp = make_inputs(cfg, jnp.bfloat16, seed=5)
    rpb = _rpb(cfg, jnp.float32, 5)
    args = (inp.q, inp.k, inp.v, rpb, inp.dout, inp.dlse)
    full = _grad_fn(cfg, "fused-mosaic")(*args)[2]
    frozen = _grad_fn(cfg, "fused-mosaic", wrt_rpb=False)(*args)[2]
    for what, a, b in zip(("dq", "dk", "dv"), full, frozen):
        assert np.array_equal(np.asarray(a), np.asarray(b)), what


def test_non_finite_value_with_a_bias_stays_in_its_windows():
    """A NaN value sends the call to the containing path (fused-triton with its bias where it
    has one, else reference): queries whose windows miss it match the oracle."""
    cfg = _cfg((64,), 9, heads=2, heads_kv=2, dim=64, dim_v=64)
    inp = make_inputs(cfg, jnp.bfloat16, seed=3)
    v = inp.v.at[0, 40, 0, 3].set(jnp.nan)
    rpb = _rpb(cfg, jnp.float32, 3)
    out = jax.jit(lambda q, k, v, b: jna.na1d(q, k, v, 9, backend="fused-mosaic", rpb=b))(inp.q, inp.k, v, rpb)
    want, _ = oracle.na(f64(inp.q), f64(inp.k), f64(inp.v), 9, rpb=f64(rpb))
    far = np.r_[0:30, 50:64]  # windows of 9 around 40 reach 36..44
    got = f64(out)
    assert np.all(np.isfinite(got[:, far]))
    assert oracle.rel_l2(got[:, far], want[:, far]) <= RTOL
    assert np.isnan(got[0, 40, 0]).any()


def test_forward_mode_with_a_bias_raises_naming_rpb():
    cfg = _cfg((128,), 9, heads=2, heads_kv=2, dim=64, dim_v=64)
    inp = make_inputs(cfg, jnp.bfloat16)
    rpb = _rpb(cfg, jnp.float32)
    f = lambda q, b: jna.na1d(q, inp.k, inp.v, 9, backend="fused-mosaic", rpb=b)
    with pytest.raises(NotImplementedError, match="rpb"):
        jax.jvp(f, (inp.q, rpb), (inp.q, rpb))


def test_cases_use_several_classes_and_chunks():
    """The cases above exercise what the bias machinery can get wrong: many tile-offset classes
    and, in the determinism case, several batch chunks of the class-sum kernel."""
    from jna._src.arguments import check_call
    from jna.backends.mosaic import op as fused_mosaic
    from jna.backends.mosaic import rpb_grad

    cfg = _cfg((48, 48), 7, heads=4, heads_kv=2, dim=128, dim_v=128, batch=4)
    inp = make_inputs(cfg, jnp.bfloat16)
    problem = check_call(inp.q, inp.k, inp.v, 7, 1, 1, False, None, None, None, None,
                         rpb=_rpb(cfg, jnp.float32))
    st = fused_mosaic._static(problem, backends.MosaicConfig((8, 16), (8, 16), 2), None, rpb=True)
    assert st.rpb.num_classes >= 9
    assert rpb_grad.chunks(st, problem.batch * st.plan.num_groups) > 1
