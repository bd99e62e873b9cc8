"""The public functional API: transformations, dispatch, options, errors, NaN isolation, memory.

Every numeric check is against the float64 oracle (never against the library itself).
"""

import functools

import jax
import jax.numpy as jnp
import pytest

import jna
from jna_tests import oracle
from jna_tests.backends import NOT_YET_BUILT, float32_backends, tiered
from jna_tests.common import (Config, assert_abs, assert_names, f64, make_inputs,
                              oracle_bwd, oracle_fwd)

BACKENDS = float32_backends()
CFG2 = Config((7, 9), (3, 4), (1, 2), (2, 1), (False, True), batch=2, heads=4, heads_kv=2,
              dim=8, dim_v=6)


@pytest.fixture(scope="module")
def inp2():
    return make_inputs(CFG2, seed=21)


def _ones_grads(cfg, inp):
    """Oracle gradients of sum(out) (dout = 1, dlse = 0)."""
    ones = dict(dout=jnp.ones_like(inp.dout), dlse=jnp.zeros_like(inp.dlse))
    return oracle_bwd(cfg, type(inp)(**{**inp.__dict__, **ones}))


@pytest.mark.parametrize("backend", tiered(BACKENDS))
def test_jit_partial_and_static_argnames(backend, inp2):
    """jit through functools.partial and through static_argnames both match the oracle."""
    want, _ = oracle_fwd(CFG2, inp2)
    f = jax.jit(functools.partial(jna.na2d, **CFG2.na_kwargs(), backend=backend))
    assert_abs(f(inp2.q, inp2.k, inp2.v), want, 1e-4, "jit(partial)")
    g = jax.jit(jna.na2d, static_argnames=("kernel_size", "stride", "dilation", "is_causal",
                                           "backend"))
    assert_abs(g(inp2.q, inp2.k, inp2.v, **CFG2.na_kwargs(), backend=backend), want, 1e-4,
               "jit(static_argnames)")


@pytest.mark.parametrize("backend", tiered(BACKENDS))
def test_vmap_over_leading_axis(backend):
    """vmap over an extra leading axis equals the oracle on each slice."""
    cfg = Config((6, 5), (3, 2), (2, 1), (1, 2), (True, False), batch=2, heads=2, heads_kv=1)
    slices = [make_inputs(cfg, seed=30 + i) for i in range(3)]
    stack = lambda name: jnp.stack([getattr(s, name) for s in slices])
    f = functools.partial(jna.na2d, **cfg.na_kwargs(), return_lse=True, backend=backend)
    out, lse = jax.vmap(f)(stack("q"), stack("k"), stack("v"))
    for i, s in enumerate(slices):
        want_out, want_lse = oracle_fwd(cfg, s)
        assert_abs(out[i], want_out, 1e-4, f"vmap out[{i}]")
        assert_abs(lse[i], want_lse, 1e-4, f"vmap lse[{i}]")


@pytest.mark.parametrize("backend", tiered(BACKENDS))
@pytest.mark.parametrize("remat", [False, True], ids=["grad", "checkpoint"])
def test_grad_and_checkpoint(backend, remat, inp2):
    """jax.grad of sum(out) wrt q, k, v (optionally under jax.checkpoint) matches the oracle."""
    f = lambda q, k, v: jna.na2d(q, k, v, **CFG2.na_kwargs(), backend=backend).sum()
    f = jax.checkpoint(f) if remat else f
    grads = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(inp2.q, inp2.k, inp2.v)
    for name, g, w in zip(("dq", "dk", "dv"), grads, _ones_grads(CFG2, inp2)):
        assert_abs(g, w, 1e-3, name)


@pytest.mark.parametrize("backend", tiered(BACKENDS))
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_neighborhood_attention_dispatches_on_rank(backend, rank):
    """neighborhood_attention takes the rank from q.ndim - 3 and matches the oracle."""
    cfg = {1: Config((13,), (4,), (3,), (2,), (True,), heads=2),
           2: Config((5, 8), (2, 5), (2, 1), (2, 1), (False, False), heads=2),
           3: Config((4, 5, 6), (2, 3, 2), (1, 3, 2), (2, 1, 3), (False, True, False))}[rank]
    inp = make_inputs(cfg, seed=40 + rank)
    out, lse = jna.neighborhood_attention(inp.q, inp.k, inp.v, **cfg.na_kwargs(),
                                          return_lse=True, backend=backend)
    want_out, want_lse = oracle_fwd(cfg, inp)
    assert_abs(out, want_out, 1e-4, "out", cfg)
    assert_abs(lse, want_lse, 1e-4, "lse", cfg)


@pytest.mark.parametrize("backend", tiered(BACKENDS))
def test_return_lse_and_default_scale(backend, inp2):
    """return_lse=False gives one array; True gives (out, float32 lse [B, *X, H]); the default
    scale is D ** -0.5 (with D_v != D, so using D_v would show)."""
    out = jna.na2d(inp2.q, inp2.k, inp2.v, **CFG2.na_kwargs(), backend=backend)
    assert isinstance(out, jax.Array) and out.shape == (2, 7, 9, 4, 6)
    res = jna.na2d(inp2.q, inp2.k, inp2.v, **CFG2.na_kwargs(), return_lse=True, backend=backend)
    assert isinstance(res, tuple) and len(res) == 2
    assert res[1].shape == (2, 7, 9, 4) and res[1].dtype == jnp.float32
    want_out, want_lse = oracle.na(f64(inp2.q), f64(inp2.k), f64(inp2.v), **CFG2.na_kwargs(),
                                   scale=8 ** -0.5)
    assert_abs(out, want_out, 1e-4, "out (default scale)")
    assert_abs(res[1], want_lse, 1e-4, "lse (default scale)")
    out2 = jna.na2d(inp2.q, inp2.k, inp2.v, **CFG2.na_kwargs(), scale=1.3, backend=backend)
    want2, _ = oracle.na(f64(inp2.q), f64(inp2.k), f64(inp2.v), **CFG2.na_kwargs(), scale=1.3)
    assert_abs(out2, want2, 1e-4, "out (scale=1.3)")


@pytest.mark.parametrize("backend", tiered(BACKENDS))
def test_scalar_arguments_apply_to_every_axis(backend):
    """Scalar kernel_size/stride/dilation/is_causal mean the same value on every axis."""
    cfg = Config((6, 8, 7), (3,) * 3, (2,) * 3, (2,) * 3, (True,) * 3, heads=2, heads_kv=1)
    inp = make_inputs(cfg, seed=45)
    out = jna.na3d(inp.q, inp.k, inp.v, 3, stride=2, dilation=2, is_causal=True,
                   backend=backend)
    assert_abs(out, oracle_fwd(cfg, inp)[0], 1e-4, "out (scalar arguments)", cfg)


def test_every_built_backend_is_under_test():
    """Each backend jna has built is listed in jna_tests/backends.py and has its
    `BackendTestBase` subclass (so it gets the sweep), and none of NOT_YET_BUILT is built."""
    import importlib

    from jna_tests.backend_test_base import BackendTestBase
    from jna_tests.backends import BACKENDS as LISTED

    built = set(jna.built_backends())
    assert built <= set(LISTED), f"add {built - set(LISTED)} to jna_tests/backends.py"
    assert not built & set(NOT_YET_BUILT), f"{built & set(NOT_YET_BUILT)} is built now"
    for name in LISTED:
        module = importlib.import_module(f"jna_tests.test_backend_{name.replace('-', '_')}")
        subclasses = [c for c in vars(module).values()
                      if isinstance(c, type) and issubclass(c, BackendTestBase) and c is not BackendTestBase]
        assert [c.backend for c in subclasses] == [name], (name, subclasses)


def test_auto_backend_matches_oracle(inp2):
    """backend="auto" (the default) runs and matches the oracle."""
    out = jna.na2d(inp2.q, inp2.k, inp2.v, **CFG2.na_kwargs())
    assert_abs(out, oracle_fwd(CFG2, inp2)[0], 1e-4, "auto out")


def test_backend_names(inp2):
    """Unknown backend -> ValueError naming `backend`; known but unbuilt -> NotImplementedError."""
    call = lambda b: jna.na2d(inp2.q, inp2.k, inp2.v, 3, backend=b)
    for bad in ("naive", "Reference", "", None):
        with pytest.raises(ValueError) as e:
            call(bad)
        assert_names(e.value, "backend")
    for name in NOT_YET_BUILT:
        with pytest.raises(NotImplementedError):
            call(name)


# ---- bad input ---------------------------------------------------------------------------------


def _arr(*shape, dtype=jnp.float32):
    return jnp.zeros(shape, dtype)


Q, K, V = _arr(1, 10, 12, 4, 8), _arr(1, 10, 12, 2, 8), _arr(1, 10, 12, 2, 6)
EK, EV = _arr(1, 3, 2, 8), _arr(1, 3, 2, 6)

BAD_CALLS = {
    # id: (call, argument the message must name, axis or None)
    "na2d_4d_q": (lambda: jna.na2d(_arr(1, 10, 4, 8), _arr(1, 10, 2, 8), _arr(1, 10, 2, 6), 3), "q", None),
    "na2d_6d_q": (lambda: jna.na2d(_arr(1, 5, 5, 5, 4, 8), _arr(1, 5, 5, 5, 2, 8), _arr(1, 5, 5, 5, 2, 6), 3), "q", None),
    "na1d_5d_q": (lambda: jna.na1d(Q, K, V, 3), "q", None),
    "na3d_5d_q": (lambda: jna.na3d(Q, K, V, 3), "q", None),
    "na2d_5d_k_only": (lambda: jna.na2d(Q, _arr(1, 10, 12, 1, 2, 8), V, 3), "k", None),
    "na_2d_q": (lambda: jna.neighborhood_attention(_arr(4, 8), _arr(4, 8), _arr(4, 8), 3), "q", None),
    "na_3d_q": (lambda: jna.neighborhood_attention(_arr(4, 2, 8), _arr(4, 2, 8), _arr(4, 2, 8), 3), "q", None),
    "na_7d_q": (lambda: jna.neighborhood_attention(*[_arr(1, 4, 4, 4, 4, 2, 8)] * 3, 3), "q", None),
    "k_batch": (lambda: jna.na2d(Q, _arr(2, 10, 12, 2, 8), V, 3), "k", None),
    "v_spatial": (lambda: jna.na2d(Q, K, _arr(1, 10, 11, 2, 6), 3), "v", 1),
    "k_spatial": (lambda: jna.na2d(Q, _arr(1, 9, 12, 2, 8), V, 3), "k", 0),
    "heads_not_multiple": (lambda: jna.na2d(_arr(1, 10, 12, 3, 8), K, V, 3), "heads", None),
    "qk_head_dim": (lambda: jna.na2d(Q, _arr(1, 10, 12, 2, 6), V, 3), "head_dim", None),
    "kv_heads": (lambda: jna.na2d(Q, K, _arr(1, 10, 12, 1, 6), 3), "heads", None),
    "kernel_lt_2": (lambda: jna.na2d(Q, K, V, (3, 1)), "kernel_size", 1),
    "kernel_times_dilation_gt_L": (lambda: jna.na2d(Q, K, V, (4, 5), dilation=(3, 1)), "kernel_size", 0),
    "kernel_gt_L": (lambda: jna.na2d(Q, K, V, (3, 13)), "kernel_size", 1),
    "stride_gt_kernel": (lambda: jna.na2d(Q, K, V, 3, stride=(1, 4)), "stride", 1),
    "stride_lt_1": (lambda: jna.na2d(Q, K, V, 3, stride=(0, 1)), "stride", 0),
    "dilation_lt_1": (lambda: jna.na2d(Q, K, V, 3, dilation=(1, 0)), "dilation", 1),
    "kernel_tuple_len": (lambda: jna.na2d(Q, K, V, (3, 3, 3)), "kernel_size", None),
    "stride_tuple_len": (lambda: jna.na2d(Q, K, V, 3, stride=(1,)), "stride", None),
    "causal_tuple_len": (lambda: jna.na2d(Q, K, V, 3, is_causal=(True, False, True)), "is_causal", None),
    "kernel_float": (lambda: jna.na2d(Q, K, V, 3.0), "kernel_size", None),
    "stride_float_axis": (lambda: jna.na2d(Q, K, V, 3, stride=(1, 2.0)), "stride", 1),
    "kernel_bool": (lambda: jna.na2d(Q, K, V, True), "kernel_size", None),
    "dilation_bool_axis": (lambda: jna.na2d(Q, K, V, 3, dilation=(1, True)), "dilation", 1),
    "causal_int": (lambda: jna.na2d(Q, K, V, 3, is_causal=1), "is_causal", None),
    "causal_str_axis": (lambda: jna.na2d(Q, K, V, 3, is_causal=(False, "yes")), "is_causal", 1),
    "mixed_dtype": (lambda: jna.na2d(Q, K.astype(jnp.bfloat16), V, 3), "k", None),
    "mixed_dtype_v": (lambda: jna.na2d(Q, K, V.astype(jnp.float16), 3), "v", None),
    "int_dtype": (lambda: jna.na2d(*(a.astype(jnp.int32) for a in (Q, K, V)), 3), "dtype", None),
    "keys_without_values": (lambda: jna.na2d(Q, K, V, 3, additional_keys=EK), "additional_values", None),
    "values_without_keys": (lambda: jna.na2d(Q, K, V, 3, additional_values=EV), "additional_keys", None),
    "extra_k_head_dim": (lambda: jna.na2d(Q, K, V, 3, additional_keys=_arr(1, 3, 2, 6), additional_values=EV), "additional_keys", None),
    "extra_k_heads": (lambda: jna.na2d(Q, K, V, 3, additional_keys=_arr(1, 3, 4, 8), additional_values=EV), "additional_keys", None),
    "extra_k_batch": (lambda: jna.na2d(Q, K, V, 3, additional_keys=_arr(2, 3, 2, 8), additional_values=EV), "additional_keys", None),
    "extra_k_rank": (lambda: jna.na2d(Q, K, V, 3, additional_keys=_arr(1, 3, 1, 2, 8), additional_values=EV), "additional_keys", None),
    "extra_v_dim": (lambda: jna.na2d(Q, K, V, 3, additional_keys=EK, additional_values=_arr(1, 3, 2, 8)), "additional_values", None),
    "extra_count_mismatch": (lambda: jna.na2d(Q, K, V, 3, additional_keys=EK, additional_values=_arr(1, 4, 2, 6)), "additional_values", None),
    "extra_dtype": (lambda: jna.na2d(Q, K, V, 3, additional_keys=EK.astype(jnp.bfloat16), additional_values=EV), "additional_keys", None),
    "unknown_backend": (lambda: jna.na2d(Q, K, V, 3, backend="flash"), "backend", None),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_is_value_error_naming_argument(case):
    """Each malformed call raises ValueError naming the argument (and axis when per-axis)."""
    call, name, axis = BAD_CALLS[case]
    with pytest.raises(ValueError) as e:
        call()
    assert_names(e.value, name, axis)


def test_traced_kernel_size_says_make_it_static():
    """jax.jit(jna.na2d)(q, k, v, 7) traces kernel_size: a ValueError that says 'static'."""
    q = _arr(1, 10, 12, 2, 8)
    with pytest.raises(ValueError) as e:
        jax.jit(jna.na2d)(q, q, q, 7)
    assert_names(e.value, "kernel_size")
    assert "static" in str(e.value)


def test_auto_on_a_gpu_without_pallas_support_warns_and_runs_reference(monkeypatch):
    """docs/backends.md ("No silent fallback"): on e.g. a T4 (sm75) neither Pallas backend runs; ``auto`` takes the
    reference backend and says why in a warning (once per reason), an explicit one raises."""
    import types

    from jna import backends
    from jna._src.arguments import NAProblem
    from jna.backends import device

    t4 = types.SimpleNamespace(platform="gpu", device_kind="Tesla T4", compute_capability="7.5")
    monkeypatch.setattr(device, "default_device", lambda: t4)
    backends._warn_reference_on_gpu.cache_clear()
    params = jna.semantics.normalize_params((8, 8), 3)
    problem = NAProblem(params, 1, 2, 2, 64, 64, jnp.dtype(jnp.bfloat16), 0.125, 0)
    with pytest.warns(UserWarning, match="reference backend .* fused-triton: needs an NVIDIA GPU"):
        assert backends.resolve("auto", problem).name == "reference"
    with pytest.raises(NotImplementedError, match="fused-triton.*cannot run on this machine"):
        backends.resolve("fused-triton", problem)


def test_public_api_is_typed():
    """Type hints on the public functions; ``return_lse=True`` types as a tuple (an overload),
    also for the per-rank functions (their `FixedRankNA` protocol)."""
    import typing

    from jna import functional

    for fn in (jna.neighborhood_attention, functional.FixedRankNA.__call__):
        plain, with_lse = typing.get_overloads(fn)
        assert typing.get_type_hints(plain)["return"] is jax.Array
        assert typing.get_type_hints(with_lse)["return"] == tuple[jax.Array, jax.Array]
    for fn in (jna.neighborhood_attention_qk, jna.neighborhood_attention_av, jna.merge_attentions,
               jna.explain):
        assert "return" in typing.get_type_hints(fn), fn.__name__
    assert typing.get_type_hints(functional)["na2d"] is functional.FixedRankNA


def test_a_changed_config_retraces_under_jit():
    """A backend instance carries its tile config and is a static argument: jitting with another
    config traces again (never silently keeps the first one's tiles), and both are exact."""
    from jna.backends import FusedTriton, TritonConfig

    cfg = Config((12, 10), (5, 4), (1, 1), (1, 1), (False, False), heads=2, heads_kv=2, dim=16, dim_v=16)
    inp = make_inputs(cfg, jnp.float32, seed=4)
    traced = []

    def na(q, k, v, backend):
        traced.append(backend)
        return jna.na2d(q, k, v, kernel_size=(5, 4), backend=backend)

    # The first Pallas call of a process registers jax config options (its trace context grows),
    # which costs any jitted function one extra trace: make that call first.
    jna.na2d(inp.q, inp.k, inp.v, kernel_size=(5, 4), backend="fused-triton")
    run = jax.jit(na, static_argnames="backend")
    want, _ = oracle_fwd(cfg, inp)
    small, large = TritonConfig((4, 4), (4, 4)), TritonConfig((4, 8), (8, 8))
    for config in (small, large, small):
        assert_abs(run(inp.q, inp.k, inp.v, backend=FusedTriton(config)), want, 1e-4, str(config))
    assert traced == [FusedTriton(small), FusedTriton(large)]  # the third call hit the cache
    lowered = {c: run.lower(inp.q, inp.k, inp.v, backend=FusedTriton(c)).as_text() for c in (small, large)}
    assert lowered[small] != lowered[large]
    with pytest.raises(ValueError, match="FusedTriton takes TritonConfig"):
        FusedTriton(object())


def test_backends_get_names_a_backend():
    from jna import backends

    assert backends.get("fused-triton") == backends.FusedTriton()
    for bad in ("auto", "nope", backends.FusedTriton()):
        with pytest.raises(ValueError, match="backend"):
            backends.get(bad)
