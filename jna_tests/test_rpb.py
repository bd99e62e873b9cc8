"""Relative positional bias (NATTEN 0.17's ``rpb``) in `jna.neighborhood_attention` / ``na*d``.

Every backend that declares ``supports_rpb`` (`jna.backends.Backend`; the list below is derived
from that flag, so a backend that gains the bias is tested here without editing this file) is
checked against the float64 oracle (`jna_tests.oracle.na` / ``na_bwd`` with ``rpb``: a dense
``[H, N, N]`` bias from the oracle's own `rpb_table`): out, lse and the gradients of q, k, v,
the additional keys/values and rpb, for random cotangents of both out and lse; and the forward
mode (`jax.jvp`) against central differences of the oracle. Cases cover 1-D/2-D/3-D, dilation,
non-square and even kernels, GQA/MQA (``rpb`` has the *query* heads), additional keys (which get
no bias), a window as large as the map, float32 and bfloat16/float16 (rpb in float32 or in
q's dtype).

float32: out/lse within 1e-4 abs, gradients within 1e-3 abs; half types: relative L2 within the
backend's ``lowp_rtol``. Then the errors (causal, stride, shape, dtype, a backend without the
bias, explicit or under ``auto``), the semantic tables against the oracle, and the Flax modules.

Fast tier: the reference backend; the other rpb backends (interpret mode on a CPU) run one case
there and the rest in the slow tier.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jna
from jna import backends
from jna._src.arguments import check_call
from jna_tests import oracle
from jna_tests.backends import BACKENDS, active_backends
from jna_tests.common import (Config, assert_abs, assert_names, assert_rel_l2, f64, layer_classes,
                              make_inputs, na_fn)

# Backends under test for the bias: those that declare it (and run on this platform).
RPB_BACKENDS = [b for b in active_backends() if backends.backend_class(b).supports_rpb]
# Built backends without it: every call with rpb must raise on them, naming rpb and the backend.
NO_RPB_BACKENDS = [b for b in backends.built_backends() if not backends.backend_class(b).supports_rpb]
FAST_BACKEND = "reference"  # the others run interpreted on a CPU: one fast case, the rest slow

GRAD_NAMES = ("dq", "dk", "dv", "d_additional_keys", "d_additional_values", "d_rpb")


def _cfg(shape, kernel_size, dilation=1, **kw):
    rank = len(shape)
    per = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * rank
    return Config(tuple(shape), per(kernel_size), (1,) * rank, per(dilation), (False,) * rank, **kw)


CASES = {
    "1d-mqa": _cfg((13,), 5, heads=2, heads_kv=1),
    "1d-even-dilated-gqa": _cfg((19,), 4, dilation=2, heads=4, heads_kv=2, dim=12, dim_v=6),
    "1d-window-is-map": _cfg((6,), 6, heads=2, heads_kv=2, batch=2),
    "2d-nonsquare-dilated-gqa": _cfg((7, 9), (3, 4), dilation=(2, 1), heads=4, heads_kv=2, batch=2),
    "2d-extra-keys": _cfg((6, 7), (3, 5), heads=2, heads_kv=1, n_extra=3, scale=0.7),
    "3d": _cfg((5, 6, 4), (3, 2, 3), dilation=(1, 2, 1), heads=2, heads_kv=1),
    "3d-extra-dilated": _cfg((4, 6, 5), (2, 3, 2), dilation=(2, 1, 2), heads=3, heads_kv=1,
                             n_extra=2, dim=4, dim_v=8),
}
# (case, dtype, rpb dtype: None = the inputs' dtype)
LOWP = [("2d-nonsquare-dilated-gqa", jnp.bfloat16, None),
        ("3d", jnp.bfloat16, jnp.float32),
        ("1d-even-dilated-gqa", jnp.float16, None)]
# The fast tier (~30 s on a CPU): these reference cases (1-D/2-D/3-D, dilation, even and
# non-square kernels, GQA/MQA, additional keys, bf16) and one case of every other rpb backend.
FAST_CASES = ("1d-mqa", "1d-even-dilated-gqa", "2d-nonsquare-dilated-gqa", "2d-extra-keys", "3d")
FAST_LOWP = ("2d-nonsquare-dilated-gqa",)
FAST_FOR_ALL = "2d-extra-keys"


def _fit(cfg: Config, dtype, backend: str):
    """The case and dtype adapted to what the backend takes (head dims, dtypes), e.g. a
    bf16-only backend runs the float32 cases in bf16."""
    caps = BACKENDS[backend]
    if (caps.same_value_dim and cfg.dim != cfg.dim_v) or min(cfg.dim, cfg.dim_v) < min(caps.head_dims):
        cfg = dataclasses.replace(cfg, dim=caps.head_dims[0], dim_v=caps.head_dims[0])
    if dtype not in caps.dtypes:
        dtype = caps.dtypes[0]
    return cfg, dtype


def _rpb(cfg: Config, dtype, seed: int):
    """A bias of order 1 (it must change the softmax noticeably), rounded to ``dtype``."""
    rng = np.random.default_rng(1000 + seed)
    shape = (cfg.heads, *(2 * k - 1 for k in cfg.kernel_size))
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32)).astype(dtype)


def _run(cfg: Config, inp, rpb, backend: str):
    """Jitted ``na*d(..., rpb=)``: ``(out, lse, (dq, dk, dv, d_extra_k, d_extra_v, d_rpb))`` for
    the cotangents ``inp.dout`` / ``inp.dlse``."""
    fn = na_fn(cfg.rank)

    def f(q, k, v, ek, ev, rpb):
        return fn(q, k, v, kernel_size=cfg.kernel_size, dilation=cfg.dilation, scale=cfg.scale,
                  additional_keys=ek, additional_values=ev, return_lse=True, backend=backend, rpb=rpb)

    @jax.jit
    def run(q, k, v, ek, ev, rpb, dout, dlse):
        (out, lse), vjp = jax.vjp(f, q, k, v, ek, ev, rpb)
        return out, lse, vjp((dout, dlse))

    return run(inp.q, inp.k, inp.v, inp.extra_k, inp.extra_v, rpb, inp.dout, inp.dlse)


def _oracle_kwargs(cfg: Config, inp, rpb):
    return dict(kernel_size=cfg.kernel_size, dilation=cfg.dilation, scale=cfg.scale,
                extra_k=f64(inp.extra_k), extra_v=f64(inp.extra_v), rpb=f64(rpb))


def _check(got, want, dtype, atol, what, info, rtol):
    if dtype == jnp.float32:
        assert_abs(got, want, atol, what, info)
    else:
        assert_rel_l2(got, want, rtol, what, info)


def _cases():
    for backend in RPB_BACKENDS:
        fast = backend == FAST_BACKEND
        for name in CASES:
            slow = not ((fast and name in FAST_CASES) or name == FAST_FOR_ALL)
            yield pytest.param(backend, name, jnp.float32, None, id=f"{backend}-{name}-float32",
                               marks=pytest.mark.slow if slow else ())
        for name, dtype, rpb_dtype in LOWP:
            slow = not (fast and name in FAST_LOWP)
            rid = jnp.dtype(rpb_dtype or dtype).name
            yield pytest.param(backend, name, dtype, rpb_dtype,
                               id=f"{backend}-{name}-{jnp.dtype(dtype).name}-rpb_{rid}",
                               marks=pytest.mark.slow if slow else ())


@pytest.mark.parametrize("backend,name,dtype,rpb_dtype", list(_cases()))
def test_against_oracle(backend, name, dtype, rpb_dtype):
    """out, lse and the gradients of q, k, v, additional k/v and rpb vs the float64 oracle."""
    seed = list(CASES).index(name)
    cfg, dtype = _fit(CASES[name], dtype, backend)
    inp = make_inputs(cfg, dtype, seed=seed)
    rpb = _rpb(cfg, rpb_dtype or dtype, seed)
    out, lse, grads = _run(cfg, inp, rpb, backend)
    kwargs = _oracle_kwargs(cfg, inp, rpb)
    want_out, want_lse = oracle.na(f64(inp.q), f64(inp.k), f64(inp.v), **kwargs)
    want_grads = oracle.na_bwd(f64(inp.q), f64(inp.k), f64(inp.v), f64(inp.dout), f64(inp.dlse),
                               **kwargs)
    info = f"{name} backend={backend} dtype={jnp.dtype(dtype).name} rpb={rpb.dtype} {cfg}"
    rtol = BACKENDS[backend].lowp_rtol
    assert out.dtype == dtype and lse.dtype == jnp.float32, (out.dtype, lse.dtype, info)
    _check(out, want_out, dtype, 1e-4, "out", info, rtol)
    _check(lse, want_lse, dtype, 1e-4, "lse", info, rtol)
    inputs = (inp.q, inp.k, inp.v, inp.extra_k, inp.extra_v, rpb)
    for what, g, w, x in zip(GRAD_NAMES, grads, want_grads, inputs):
        assert (g is None) == (w is None), (what, info)
        if w is None:
            continue
        assert g.dtype == x.dtype and g.shape == x.shape, (what, g.dtype, g.shape, info)
        _check(g, w, dtype, 1e-3, what, info, rtol)


def test_the_bias_matters_and_extra_keys_get_none():
    """The oracle cases are sensitive to the bias (dropping it would fail them), and the
    additional keys get none: adding a constant to the whole table shifts every window logit
    but no extra key's, so the output changes exactly as the oracle says."""
    cfg = CASES["2d-extra-keys"]
    inp = make_inputs(cfg, seed=1)
    rpb = _rpb(cfg, jnp.float32, 1)
    na = jax.jit(functools.partial(jna.na2d, kernel_size=cfg.kernel_size, scale=cfg.scale,
                                   additional_keys=inp.extra_k, additional_values=inp.extra_v,
                                   backend=FAST_BACKEND))
    with_bias, without = na(inp.q, inp.k, inp.v, rpb=rpb), na(inp.q, inp.k, inp.v)
    assert float(jnp.abs(with_bias - without).max()) > 0.1
    shifted = na(inp.q, inp.k, inp.v, rpb=rpb + 3.0)
    kwargs = _oracle_kwargs(cfg, inp, rpb + 3.0)
    want, _ = oracle.na(f64(inp.q), f64(inp.k), f64(inp.v), **kwargs)
    assert_abs(shifted, want, 1e-4, "out with rpb + 3")
    assert float(jnp.abs(shifted - with_bias).max()) > 0.01  # extras got no +3


@pytest.mark.parametrize("backend", [pytest.param(b, marks=() if b == FAST_BACKEND else pytest.mark.slow)
                                     for b in RPB_BACKENDS])
def test_forward_mode_against_oracle_differences(backend):
    """jax.jvp in q, k, v, additional k/v and rpb at once: the tangents of out and lse equal the
    float64 oracle's central differences along the same direction."""
    cfg, dtype = _fit(CASES["2d-extra-keys"], jnp.float32, backend)
    if dtype != jnp.float32:
        pytest.skip(f"{backend} takes no float32 (the check needs float32 tolerances)")
    inp = make_inputs(cfg, seed=7)
    rpb = _rpb(cfg, jnp.float32, 7)
    primals = (inp.q, inp.k, inp.v, inp.extra_k, inp.extra_v, rpb)
    rng = np.random.default_rng(8)
    tangents = tuple(jnp.asarray(rng.standard_normal(x.shape), jnp.float32) for x in primals)

    def f(q, k, v, ek, ev, rpb):
        return jna.na2d(q, k, v, cfg.kernel_size, scale=cfg.scale, additional_keys=ek,
                        additional_values=ev, return_lse=True, backend=backend, rpb=rpb)

    _, (d_out, d_lse) = jax.jit(lambda p, t: jax.jvp(f, p, t))(primals, tangents)

    def oracle_at(eps):
        q, k, v, ek, ev, b = (f64(x) + eps * f64(t) for x, t in zip(primals, tangents))
        return oracle.na(q, k, v, kernel_size=cfg.kernel_size, scale=cfg.scale, extra_k=ek,
                         extra_v=ev, rpb=b)

    eps = 1e-4
    (o1, l1), (o0, l0) = oracle_at(eps), oracle_at(-eps)
    assert_abs(d_out, (o1 - o0) / (2 * eps), 1e-3, f"jvp out ({backend})")
    assert_abs(d_lse, (l1 - l0) / (2 * eps), 1e-3, f"jvp lse ({backend})")


def test_jit_vmap_and_neighborhood_attention_dispatch():
    """rpb is an ordinary traced argument: one jit serves new bias values; vmap over a leading
    axis of q/k/v with a shared rpb; `neighborhood_attention` takes the rank from q."""
    cfg = CASES["1d-mqa"]
    inp = make_inputs(dataclasses.replace(cfg, batch=3), seed=2)
    rpb = _rpb(cfg, jnp.float32, 2)
    f = jax.jit(functools.partial(jna.neighborhood_attention, kernel_size=5, backend=FAST_BACKEND))
    for table in (rpb, 2.0 * rpb):
        want, _ = oracle.na(f64(inp.q), f64(inp.k), f64(inp.v), 5, rpb=f64(table))
        assert_abs(f(inp.q, inp.k, inp.v, rpb=table), want, 1e-4, "jit")
    per_item = jax.vmap(lambda q, k, v: jna.na1d(q[None], k[None], v[None], 5, rpb=rpb,
                                                 backend=FAST_BACKEND)[0])
    want, _ = oracle.na(f64(inp.q), f64(inp.k), f64(inp.v), 5, rpb=f64(rpb))
    assert_abs(per_item(inp.q, inp.k, inp.v), want, 1e-4, "vmap")


# ---- the oracle's bias and the library's index tables -------------------------------------------


def test_oracle_bias_composes_and_its_backward_equals_autodiff():
    """The oracle's dense-bias NA equals its unfused chain (qk with rpb -> softmax -> av, checked
    in test_unfused.py) and its hand backward (incl. d_rpb) equals float64 jax autodiff of it."""
    cfg = CASES["2d-nonsquare-dilated-gqa"]
    inp = make_inputs(cfg, seed=3)
    q, k, v, dout, dlse = (f64(x) for x in (inp.q, inp.k, inp.v, inp.dout, inp.dlse))
    rpb = f64(_rpb(cfg, jnp.float32, 3))
    window = dict(kernel_size=cfg.kernel_size, dilation=cfg.dilation)
    out, lse = oracle.na(q, k, v, **window, rpb=rpb)
    table = oracle.slot_table(cfg.shape, cfg.kernel_size, 1, cfg.dilation)
    index = oracle.rpb_table(cfg.shape, cfg.kernel_size, cfg.dilation)
    logits = oracle.qk(q, k, table, None, rpb, index)
    m = logits.max(-1, keepdims=True)
    w = np.exp(logits - m) / np.exp(logits - m).sum(-1, keepdims=True)
    np.testing.assert_allclose(out, oracle.av(w, v, table), atol=1e-12)
    np.testing.assert_allclose(lse, (np.log(np.exp(logits - m).sum(-1)) + m[..., 0]), atol=1e-12)

    mask = oracle.na_mask(cfg.shape, **window)
    with jax.enable_x64(True):
        def f(q, k, v, rpb):
            bias = jnp.zeros((cfg.heads, *mask.shape)).at[:, np.arange(mask.shape[0])[:, None], table].set(
                rpb.reshape(cfg.heads, -1)[:, index])
            b, n, h = cfg.batch, mask.shape[0], cfg.heads
            kh = jnp.repeat(k.reshape(b, n, cfg.heads_kv, -1), h // cfg.heads_kv, axis=2)
            vh = jnp.repeat(v.reshape(b, n, cfg.heads_kv, -1), h // cfg.heads_kv, axis=2)
            s = jnp.einsum("bqhd,bkhd->bhqk", q.reshape(b, n, h, -1), kh) * cfg.dim ** -0.5 + bias
            s = jnp.where(mask, s, -jnp.inf)
            lse = jax.nn.logsumexp(s, axis=-1)
            o = jnp.einsum("bhqk,bkhd->bqhd", jnp.exp(s - lse[..., None]), vh)
            return o.reshape(out.shape), lse.transpose(0, 2, 1).reshape(lse.shape[0], *cfg.shape, h)

        (o, l), vjp = jax.vjp(f, *(jnp.asarray(x) for x in (q, k, v, rpb)))
        want = vjp((jnp.asarray(dout), jnp.asarray(dlse)))
    np.testing.assert_allclose(out, np.asarray(o), atol=1e-12)
    got = oracle.na_bwd(q, k, v, dout, dlse, **window, rpb=rpb)
    for what, g, w_ in zip(("dq", "dk", "dv", "d_rpb"), (*got[:3], got[5]), want):
        np.testing.assert_allclose(g, np.asarray(w_), atol=1e-10, err_msg=what)


@pytest.mark.parametrize("name", list(CASES))
def test_semantic_tables_match_the_oracle(name):
    """`semantics.relative_position_table` (what the kernels will read) equals the oracle's
    `rpb_table`, and `relative_position_index_of_key` gives the same index from (query, key)."""
    cfg = CASES[name]
    params = jna.semantics.normalize_params(cfg.shape, cfg.kernel_size, 1, cfg.dilation)
    want = oracle.rpb_table(cfg.shape, cfg.kernel_size, cfg.dilation)
    got = jna.semantics.relative_position_table(params)
    assert got.shape == (*cfg.shape, math.prod(cfg.kernel_size)) and got.dtype == np.int32
    np.testing.assert_array_equal(got.reshape(want.shape), want)
    keys = oracle.slot_table(cfg.shape, cfg.kernel_size, 1, cfg.dilation)
    x = np.indices(cfg.shape).reshape(cfg.rank, -1)[:, :, None]  # [rank, N, 1]
    y = np.stack(np.unravel_index(keys, cfg.shape))  # [rank, N, prod(K)]
    per_axis = [jna.semantics.relative_position_index_of_key(x[a], y[a], cfg.kernel_size[a],
                                                             cfg.dilation[a]) for a in range(cfg.rank)]
    np.testing.assert_array_equal(
        jna.semantics.flat_relative_position_index(per_axis, cfg.kernel_size), want)


# ---- errors and backend choice ------------------------------------------------------------------


def _z(*shape, dtype=jnp.float32):
    return jnp.zeros(shape, dtype)


Q, K, V = _z(1, 8, 9, 4, 8), _z(1, 8, 9, 2, 8), _z(1, 8, 9, 2, 6)
RPB = _z(4, 5, 5)  # kernel 3x3, 4 query heads

NOT_IMPLEMENTED = {
    # id: (call, axis named)
    "causal": (lambda: jna.na2d(Q, K, V, 3, is_causal=(False, True), rpb=RPB), 1),
    "stride": (lambda: jna.na2d(Q, K, V, 3, stride=(2, 1), rpb=RPB), 0),
    "causal_auto_rank": (lambda: jna.neighborhood_attention(Q, K, V, 3, is_causal=True, rpb=RPB), 0),
}

BAD = {
    "kv_heads_not_query_heads": lambda: jna.na2d(Q, K, V, 3, rpb=_z(2, 5, 5)),
    "kernel_extent": lambda: jna.na2d(Q, K, V, 3, rpb=_z(4, 5, 3)),
    "rank": lambda: jna.na2d(Q, K, V, 3, rpb=_z(4, 5)),
    "int": lambda: jna.na2d(Q, K, V, 3, rpb=_z(4, 5, 5, dtype=jnp.int32)),
    "bf16_with_f32_inputs": lambda: jna.na2d(Q, K, V, 3, rpb=RPB.astype(jnp.bfloat16)),
    "f16_with_bf16_inputs": lambda: jna.na2d(*(x.astype(jnp.bfloat16) for x in (Q, K, V)), 3,
                                             rpb=RPB.astype(jnp.float16)),
    "not_an_array": lambda: jna.na2d(Q, K, V, 3, rpb=[[0.0]]),
}


@pytest.mark.parametrize("case", list(NOT_IMPLEMENTED))
def test_causal_or_strided_is_not_implemented_naming_rpb(case):
    call, axis = NOT_IMPLEMENTED[case]
    with pytest.raises(NotImplementedError) as e:
        call()
    assert_names(e.value, "rpb", axis)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_rpb_is_value_error_naming_rpb(case):
    with pytest.raises(ValueError) as e:
        BAD[case]()
    assert_names(e.value, "rpb")


def test_rpb_dtype_may_be_float32_or_the_inputs():
    """float32 and q's dtype are both accepted; the gradient comes back in rpb's own dtype."""
    q, k, v = (x.astype(jnp.bfloat16) for x in (Q, K, V))
    grad = jax.jit(jax.grad(lambda b: jna.na2d(q, k, v, 3, rpb=b).astype(jnp.float32).sum()))
    for dtype in (jnp.float32, jnp.bfloat16):
        g = grad(RPB.astype(dtype))
        assert g.dtype == dtype and g.shape == RPB.shape


@pytest.mark.parametrize("name", NO_RPB_BACKENDS)
def test_explicit_backend_without_rpb_raises_naming_both(name):
    """On any machine (the missing feature is reported before availability)."""
    with pytest.raises(NotImplementedError) as e:
        jna.na2d(Q, K, V, 3, rpb=RPB, backend=name)
    assert_names(e.value, "rpb")
    assert repr(name) in str(e.value), str(e.value)


@dataclasses.dataclass(frozen=True)
class _NoBias(backends.Reference):
    """A backend that runs everything the reference runs, except the bias."""

    name: ClassVar[str] = "no-bias"
    supports_rpb: ClassVar[bool] = False


def test_a_backend_without_the_flag_never_gets_the_bias():
    """The flag alone decides: an instance without it raises (explicitly, and in `Backend.run`
    if called directly), and takes the same call without a bias."""
    with pytest.raises(NotImplementedError, match=r"rpb.*'no-bias'"):
        jna.na2d(Q, K, V, 3, rpb=RPB, backend=_NoBias())
    problem = check_call(Q, K, V, 3, 1, 1, False, None, None, None, None, rpb=RPB)
    with pytest.raises(NotImplementedError, match=r"'no-bias'.*rpb"):
        _NoBias().run(Q, K, V, problem, RPB)
    plain = check_call(Q, K, V, 3, 1, 1, False, None, None, None, None)
    assert backends.choose(_NoBias(), plain).name == "no-bias"  # and takes the call without it


def test_auto_on_a_gpu_passes_over_backends_without_rpb(monkeypatch):
    """On an H100 (patched device), ``auto`` takes a fused backend without a bias but passes
    over every backend lacking ``supports_rpb`` with one, saying why (and warns when that leaves
    the reference backend)."""
    from jna.backends import device

    h100 = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100", compute_capability="9.0")
    monkeypatch.setattr(device, "default_device", lambda: h100)
    backends._warn_reference_on_gpu.cache_clear()
    q, k, v = (jax.ShapeDtypeStruct((1, 32, 32, 4, 64), jnp.bfloat16) for _ in range(3))
    rpb = jax.ShapeDtypeStruct((4, 13, 13), jnp.float32)
    plain = check_call(q, k, v, 7, 1, 1, False, None, None, None, None)
    biased = check_call(q, k, v, 7, 1, 1, False, None, None, None, None, rpb=rpb)
    assert biased.has_rpb and not plain.has_rpb
    assert backends.choose("auto", plain).name != "reference"
    choice = backends.choose("auto", biased)
    assert backends.backend_class(choice.name).supports_rpb
    skipped = dict(choice.passed_over)
    for name in backends.AUTO_ORDER[:backends.AUTO_ORDER.index(choice.name)]:
        if not backends.backend_class(name).supports_rpb:
            assert "rpb" in skipped[name] and repr(name) in skipped[name], skipped
    if choice.name == "reference":
        with pytest.warns(UserWarning, match="rpb"):
            backends.resolve("auto", biased)
    explanation = jna.explain(q, k, v, 7, rpb=rpb)
    assert explanation.backend == choice.name and "rpb" in str(explanation)


def test_capability_flags():
    """Every built backend declares the flag as a class attribute; the reference has it."""
    for name in backends.built_backends():
        assert isinstance(backends.backend_class(name).supports_rpb, bool), name
    assert backends.Reference.supports_rpb and "reference" in RPB_BACKENDS


# ---- Flax modules --------------------------------------------------------------------------------


@pytest.fixture
def _exact_float32_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.mark.parametrize("framework", ["linen", pytest.param("nnx", marks=pytest.mark.slow)])
@pytest.mark.parametrize("backend", [pytest.param(b, marks=() if b == FAST_BACKEND else pytest.mark.slow)
                                     for b in RPB_BACKENDS if jnp.float32 in BACKENDS[b].dtypes])
def test_module_bias_runs_on_its_backend_as_the_unfused_chain(framework, backend, _exact_float32_matmuls):
    """``rel_pos_bias=True`` runs `jna.neighborhood_attention(rpb=)` on the layer's backend and
    gives what the layer computed before (QKV -> na2d_qk with rpb -> softmax -> na2d_av ->
    proj), outputs and gradients of every parameter incl. rpb."""
    from flax import nnx

    kwargs = dict(num_heads=2, kernel_size=(3, 4), dilation=(2, 1), rel_pos_bias=True, backend=backend)
    x = jax.random.normal(jax.random.key(0), (2, 7, 8, 8), jnp.float32)
    loss = lambda y: (y ** 2).sum()
    if framework == "linen":
        layer = layer_classes("linen")[2](**kwargs)
        params = layer.init(jax.random.key(1), x)
        params["params"]["rpb"] = jax.random.normal(jax.random.key(2), params["params"]["rpb"].shape)
        out = jax.jit(layer.apply)(params, x)
        grads = jax.jit(jax.grad(lambda p: loss(layer.apply(p, x))))(params)["params"]
    else:
        layer = layer_classes("nnx")[2](in_features=8, **kwargs, rngs=nnx.Rngs(1))
        layer.rpb.set_value(jax.random.normal(jax.random.key(2), layer.rpb.shape))
        params = {"params": nnx.to_pure_dict(nnx.state(layer, nnx.Param))}
        out = nnx.jit(lambda m: m(x))(layer)
        grads = nnx.to_pure_dict(nnx.jit(nnx.grad(lambda m: loss(m(x))))(layer))

    table = oracle.slot_table((7, 8), (3, 4), 1, (2, 1))  # [N, 12] key of each (query, slot)
    index = oracle.rpb_table((7, 8), (3, 4), (2, 1))  # [N, 12] flat bias index

    def before(p):
        """What the layer computed before rpb reached neighborhood_attention (QKV -> logits +
        bias -> float32 softmax -> weighted sum -> proj; the unfused ops' formula, here from the
        oracle's tables in plain jnp)."""
        p = p["params"]
        qkv = x @ p["qkv"]["kernel"] + p["qkv"]["bias"]
        q, k, v = (t.reshape(2, 56, 2, 4) for t in jnp.unstack(qkv.reshape(2, 7, 8, 3, 2, 4), axis=-3))
        logits = jnp.einsum("bnhd,bnjhd->bnhj", q, k[:, table]) * 4 ** -0.5
        logits = logits + jnp.transpose(p["rpb"].reshape(2, -1)[:, index], (1, 0, 2))
        attn = jnp.einsum("bnhj,bnjhd->bnhd", jax.nn.softmax(logits, axis=-1), v[:, table])
        return attn.reshape(x.shape) @ p["proj"]["kernel"] + p["proj"]["bias"]

    assert_abs(out, jax.jit(before)(params), 1e-5, f"{framework} output")
    want = jax.jit(jax.grad(lambda p: loss(before(p))))(params)["params"]
    assert jax.tree.structure(grads) == jax.tree.structure(want)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want)):
        assert_abs(g, w, 1e-4, f"{framework} grad {jax.tree_util.keystr(path)}")
    assert float(jnp.abs(grads["rpb"]).max()) > 0


def test_module_bias_on_a_backend_without_it_raises():
    layer = layer_classes("linen")[2](num_heads=2, kernel_size=3, rel_pos_bias=True, backend=_NoBias())
    x = jnp.zeros((1, 6, 6, 8))
    with pytest.raises(NotImplementedError) as e:
        layer.init(jax.random.key(0), x)
    assert_names(e.value, "rpb")
