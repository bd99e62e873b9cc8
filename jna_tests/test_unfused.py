"""The unfused ops `jna.na*d_qk` / `jna.na*d_av` (+ relative positional bias) and the Flax
modules' ``rel_pos_bias``, against the float64 oracle (`jna_tests.oracle.slot_table`, `qk`,
`av` and their hand-written backward passes).

float32: logits, softmax weights and outputs within 1e-4 abs, gradients (q, k, rpb, attn, v)
within 1e-3 abs; bf16/fp16: relative L2 within 1e-2. Masked (causal) slots must be ``-inf``
in the logits, exactly where the oracle's window rule masks them.

The ``gpu``-marked test at the end compares larger problems with the reference backend on a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jna
from jna_tests import oracle
from jna_tests.common import assert_abs, assert_names, assert_rel_l2, f64

QK = {1: jna.na1d_qk, 2: jna.na2d_qk, 3: jna.na3d_qk}
AV = {1: jna.na1d_av, 2: jna.na2d_av, 3: jna.na3d_av}


@dataclasses.dataclass(frozen=True)
class Case:
    shape: tuple
    kernel_size: tuple
    stride: tuple
    dilation: tuple
    is_causal: tuple
    heads: int = 2
    heads_kv: int = 1
    dim: int = 8
    dim_v: int = 8
    batch: int = 1
    rpb: bool = False
    scale: float | None = None

    @property
    def rank(self):
        return len(self.shape)

    def window(self):
        return dict(kernel_size=self.kernel_size, stride=self.stride, dilation=self.dilation,
                    is_causal=self.is_causal)

    def table(self):
        return oracle.slot_table(self.shape, **self.window())


CASES = {
    "1d": Case((13,), (5,), (1,), (1,), (False,), rpb=True),
    "1d-even-dilated-gqa": Case((19,), (4,), (1,), (2,), (False,), heads=4, heads_kv=2, rpb=True,
                                dim=12, dim_v=6),
    "1d-causal-strided": Case((21,), (6,), (3,), (1,), (True,), heads=3, heads_kv=3, scale=0.7),
    "2d": Case((7, 9), (3, 4), (1, 1), (2, 1), (False, False), heads=4, heads_kv=2, rpb=True,
               batch=2),
    "2d-causal-strided": Case((9, 6), (5, 3), (2, 3), (1, 2), (True, False), dim=4, dim_v=12),
    "2d-blocked": Case((8, 8), (4, 4), (4, 4), (1, 1), (False, False)),
    "3d": Case((5, 6, 4), (3, 2, 3), (1, 1, 1), (1, 2, 1), (False, False, False), rpb=True),
    "3d-causal": Case((4, 6, 5), (2, 3, 5), (1, 2, 5), (2, 1, 1), (True, False, True),
                      heads=2, heads_kv=2),
}
LOWP_CASES = {"2d": jnp.bfloat16, "1d-causal-strided": jnp.float16, "3d": jnp.bfloat16}


def _inputs(case: Case, dtype, seed: int):
    rng = np.random.default_rng(seed)
    arr = lambda *s: jnp.asarray(rng.standard_normal(s, dtype=np.float32))
    b, x, kk = case.batch, case.shape, math.prod(case.kernel_size)
    q = arr(b, *x, case.heads, case.dim).astype(dtype)
    k = arr(b, *x, case.heads_kv, case.dim).astype(dtype)
    v = arr(b, *x, case.heads_kv, case.dim_v).astype(dtype)
    rpb = (0.5 * arr(case.heads, *(2 * k_ - 1 for k_ in case.kernel_size))) if case.rpb else None
    attn = jax.nn.softmax(arr(b, *x, case.heads, kk), axis=-1)  # float32 weights for av
    dlogits = arr(b, *x, case.heads, kk)
    dout = arr(b, *x, case.heads, case.dim_v)
    return q, k, v, rpb, attn, dlogits, dout


def _check(got, want, dtype, atol, what, info):
    if dtype == jnp.float32:
        assert_abs(got, want, atol, what, info)
    else:
        assert_rel_l2(got, want, 1e-2, what, info)


def _masked_check(logits, want, dtype, what, info):
    """-inf exactly where the oracle masks; finite values compared."""
    got = f64(logits)
    masked = np.isneginf(want)
    np.testing.assert_array_equal(np.isneginf(got), masked, err_msg=f"{what}: -inf pattern [{info}]")
    _check(np.where(masked, 0.0, got), np.where(masked, 0.0, want), dtype, 1e-4, what, info)


def _run(case: Case, dtype, seed: int):
    """Our logits/weights/output and all gradients, jitted; and the oracle's."""
    q, k, v, rpb, attn, dlogits, dout = _inputs(case, dtype, seed)
    qk = functools.partial(QK[case.rank], **case.window(), scale=case.scale)
    av = functools.partial(AV[case.rank], **case.window())

    @jax.jit
    def ours(q, k, v, rpb, attn, dlogits, dout):
        logits, qk_vjp = jax.vjp(lambda q, k, rpb: qk(q, k, rpb=rpb), q, k, rpb)
        weights = jax.nn.softmax(logits, axis=-1)
        out, av_vjp = jax.vjp(av, attn, v)
        out_w = av(weights, v)
        return logits, weights, out, out_w, qk_vjp(dlogits), av_vjp(dout.astype(out.dtype))

    got = ours(q, k, v, rpb, attn, dlogits, dout)

    table = case.table()
    rpb_index = oracle.rpb_table(case.shape, case.kernel_size, case.dilation) if case.rpb else None
    want_logits = oracle.qk(f64(q), f64(k), table, case.scale, f64(rpb), rpb_index)
    m = want_logits.max(-1, keepdims=True)
    e = np.exp(want_logits - m)
    want_weights = e / e.sum(-1, keepdims=True)
    want = dict(
        logits=want_logits,
        weights=want_weights,
        out=oracle.av(f64(attn), f64(v), table),
        out_w=oracle.av(f64(got[1]), f64(v), table),  # AV of our own weights (AV checked alone)
        qk=oracle.qk_bwd(f64(q), f64(k), table, f64(dlogits), case.scale,
                         None if rpb is None else rpb.shape, rpb_index),
        av=oracle.av_bwd(f64(attn), f64(v), table, f64(dout.astype(dtype))),
    )
    return (q, k, v, rpb, attn), got, want


def _ids():
    for name in CASES:
        yield pytest.param(name, jnp.float32, id=f"{name}-f32")
    for name, dtype in LOWP_CASES.items():
        yield pytest.param(name, dtype, id=f"{name}-{jnp.dtype(dtype).name}")


@pytest.mark.parametrize("name,dtype", list(_ids()))
def test_qk_av_against_oracle(name, dtype):
    """Logits (-inf where masked), softmax weights, AV output, and the gradients of q, k, rpb
    (for random logit cotangents) and of attn, v (for random output cotangents)."""
    case = CASES[name]
    (q, k, v, rpb, attn), got, want = _run(case, dtype, seed=list(CASES).index(name))
    logits, weights, out, out_w, (dq, dk, drpb), (dattn, dv) = got
    info = f"{name} {case} dtype={jnp.dtype(dtype).name}"
    kk = math.prod(case.kernel_size)
    assert logits.shape == (case.batch, *case.shape, case.heads, kk) and logits.dtype == jnp.float32
    assert out.shape == (case.batch, *case.shape, case.heads, case.dim_v) and out.dtype == dtype
    _masked_check(logits, want["logits"], dtype, "logits", info)
    _check(weights, want["weights"], dtype, 1e-4, "weights", info)
    _check(out, want["out"], dtype, 1e-4, "av out", info)
    _check(out_w, want["out_w"], dtype, 1e-4, "av(softmax(qk)) out", info)
    wq, wk, wrpb = want["qk"]
    wattn, wv = want["av"]
    assert dq.dtype == q.dtype and dk.dtype == k.dtype and dv.dtype == v.dtype
    assert dattn.dtype == attn.dtype
    for g, w, what in ((dq, wq, "dq"), (dk, wk, "dk"), (dattn, wattn, "dattn"), (dv, wv, "dv")):
        _check(g, w, dtype, 1e-3, what, info)
    if case.rpb:
        assert drpb.shape == rpb.shape
        _check(drpb, wrpb, dtype, 1e-3, "drpb", info)
    else:
        assert drpb is None


def test_end_to_end_matches_fused_semantics():
    """softmax(na2d_qk) -> na2d_av equals the oracle's NA (dense masked softmax), and
    backend="unfused" of na2d gives the same output and lse."""
    case = CASES["2d-causal-strided"]
    q, k, v, *_ = _inputs(case, jnp.float32, seed=3)
    logits = jna.na2d_qk(q, k, **case.window())
    out = jna.na2d_av(jax.nn.softmax(logits, axis=-1), v, **case.window())
    want_out, want_lse = oracle.na(f64(q), f64(k), f64(v), **case.window())
    assert_abs(out, want_out, 1e-4, "av(softmax(qk))")
    assert_abs(jax.nn.logsumexp(logits, axis=-1), want_lse, 1e-4, "logsumexp(qk)")
    out2, lse2 = jna.na2d(q, k, v, **case.window(), return_lse=True, backend="unfused")
    assert_abs(out2, want_out, 1e-4, "na2d unfused out")
    assert_abs(lse2, want_lse, 1e-4, "na2d unfused lse")


def test_av_takes_half_precision_weights():
    """attn may be in v's (half) dtype; masked slots are ignored whatever they hold (NaN)."""
    case = CASES["1d-causal-strided"]
    _, _, v, _, attn, _, _ = _inputs(case, jnp.bfloat16, seed=4)
    table = case.table()
    attn = jnp.where(jnp.asarray(table >= 0)[None, :, None, :], attn, jnp.nan).astype(jnp.bfloat16)
    out = jna.na1d_av(attn, v, **case.window())
    assert out.dtype == jnp.bfloat16
    assert_rel_l2(out, oracle.av(f64(attn), f64(v), table), 1e-2, "bf16 av")


def test_window_wider_than_head_dims():
    """prod(K) = 260 slots (more than any head dim a kernel takes): qk and av still run."""
    case = Case((264,), (260,), (1,), (1,), (False,), heads=1, heads_kv=1, dim=4, dim_v=4)
    q, k, v, _, attn, _, _ = _inputs(case, jnp.float32, seed=7)
    table = case.table()
    assert_abs(jna.na1d_qk(q, k, 260), oracle.qk(f64(q), f64(k), table), 1e-4, "qk K=260")
    assert_abs(jna.na1d_av(attn, v, 260), oracle.av(f64(attn), f64(v), table), 1e-4, "av K=260")


def test_explicit_config_changes_tiles_not_results():
    """``Unfused(config)`` sets the tiles (fitted to the problem); results stay exact."""
    from jna._src.arguments import check_qk_call
    from jna.backends.triton import unfused as unfused
    from jna.backends.triton.fused import TritonConfig

    case = CASES["1d-causal-strided"]
    q, k, _, _, _, _, _ = _inputs(case, jnp.float32, seed=8)
    want = oracle.qk(f64(q), f64(k), case.table(), case.scale)
    problem = check_qk_call(q, k, *case.window().values(), case.scale, None)
    backend = unfused.Unfused(TritonConfig((16,), (32,)))
    assert backend.config_for(problem).q_tile == (16,)
    assert backend.config_for(problem).kv_tile == (32,)
    _masked_check(backend.qk(q, k, problem), want, jnp.float32, "logits (q16 kv32)", case)


# ---- the oracle itself --------------------------------------------------------------------------


def test_oracle_slot_and_bias_tables_by_hand():
    """Slot and bias tables of a 1-D problem worked out by hand (L=7, K=3; causal K=3)."""
    np.testing.assert_array_equal(
        oracle.slot_table((7,), 3),
        [[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, 6], [4, 5, 6]])
    np.testing.assert_array_equal(
        oracle.slot_table((5,), 3, is_causal=True),
        [[0, -1, -1], [0, 1, -1], [0, 1, 2], [1, 2, 3], [2, 3, 4]])
    # (y - x) + K - 1: query 0 sees keys 0, 1, 2 -> 2, 3, 4; query 6 sees 4, 5, 6 -> 0, 1, 2.
    np.testing.assert_array_equal(
        oracle.rpb_table((7,), 3),
        [[2, 3, 4], [1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3], [0, 1, 2]])
    # dilation 2 on L = 8 (groups of 4): query 1 (x' = 0) sees 1, 3, 5 -> y' - x' = 0, 1, 2.
    assert list(oracle.rpb_table((8,), 3, dilation=2)[1]) == [2, 3, 4]


def _close64(got, want, what):
    """float64 comparison (assert_abs rounds through float32)."""
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64),
                               atol=1e-12, rtol=0, err_msg=what)


def test_oracle_unfused_consistent_with_dense_and_autodiff():
    """The oracle's qk/av compose to its dense NA, and their hand backward equals jax autodiff
    (float64) of a gather formula written here."""
    case = CASES["2d"]
    q, k, v, rpb, attn, dlogits, dout = (f64(a) for a in _inputs(case, jnp.float32, seed=5))
    table = case.table()
    index = oracle.rpb_table(case.shape, case.kernel_size, case.dilation)
    no_bias = oracle.qk(q, k, table)
    m = no_bias.max(-1, keepdims=True)
    w = np.exp(no_bias - m) / np.exp(no_bias - m).sum(-1, keepdims=True)
    _close64(oracle.av(w, v, table), oracle.na(q, k, v, **case.window())[0], "composition")

    b, n, h = case.batch, math.prod(case.shape), case.heads
    with jax.enable_x64(True):
        def qk_formula(q, k, rpb):
            kh = jnp.repeat(k.reshape(b, n, case.heads_kv, -1), h // case.heads_kv, axis=2)
            s = jnp.einsum("bnhd,bnjhd->bnhj", q.reshape(b, n, h, -1), kh[:, table])
            s = s * case.dim ** -0.5 + jnp.transpose(rpb.reshape(h, -1)[:, index], (1, 0, 2))
            return s.reshape(b, *case.shape, h, -1)

        def av_formula(a, v):
            vh = jnp.repeat(v.reshape(b, n, case.heads_kv, -1), h // case.heads_kv, axis=2)
            o = jnp.einsum("bnhj,bnjhd->bnhd", a.reshape(b, n, h, -1), vh[:, table])
            return o.reshape(b, *case.shape, h, -1)

        logits, vjp = jax.vjp(qk_formula, jnp.asarray(q), jnp.asarray(k), jnp.asarray(rpb))
        want_qk = vjp(jnp.asarray(dlogits))
        out, vjp = jax.vjp(av_formula, jnp.asarray(attn), jnp.asarray(v))
        want_av = vjp(jnp.asarray(dout))
    _close64(oracle.qk(q, k, table, None, rpb, index), np.asarray(logits), "qk")
    _close64(oracle.av(attn, v, table), np.asarray(out), "av")
    for g, w_, what in zip(oracle.qk_bwd(q, k, table, dlogits, None, rpb.shape, index), want_qk,
                           ("dq", "dk", "drpb")):
        _close64(g, np.asarray(w_), what)
    for g, w_, what in zip(oracle.av_bwd(attn, v, table, dout), want_av, ("dattn", "dv")):
        _close64(g, np.asarray(w_), what)


# ---- errors --------------------------------------------------------------------------------------


def _z(*shape, dtype=jnp.float32):
    return jnp.zeros(shape, dtype)


Q2, K2, V2 = _z(1, 8, 9, 4, 8), _z(1, 8, 9, 2, 8), _z(1, 8, 9, 2, 6)
A2 = _z(1, 8, 9, 4, 9)  # kernel 3x3

NOT_IMPLEMENTED = {
    "rpb_causal": lambda: jna.na2d_qk(Q2, K2, 3, is_causal=(False, True), rpb=_z(4, 5, 5)),
    "rpb_stride": lambda: jna.na2d_qk(Q2, K2, 3, stride=(2, 1), rpb=_z(4, 5, 5)),
}

BAD = {
    # id: (call, argument named, axis or None)
    "rpb_shape": (lambda: jna.na2d_qk(Q2, K2, 3, rpb=_z(4, 5, 4)), "rpb", None),
    "rpb_heads": (lambda: jna.na2d_qk(Q2, K2, 3, rpb=_z(2, 5, 5)), "rpb", None),
    "rpb_rank": (lambda: jna.na2d_qk(Q2, K2, 3, rpb=_z(4, 5)), "rpb", None),
    "rpb_int": (lambda: jna.na2d_qk(Q2, K2, 3, rpb=_z(4, 5, 5, dtype=jnp.int32)), "rpb", None),
    "rpb_not_array": (lambda: jna.na2d_qk(Q2, K2, 3, rpb=[[0.0]]), "rpb", None),
    "qk_kernel_axis": (lambda: jna.na2d_qk(Q2, K2, (3, 10)), "kernel_size", 1),
    "qk_heads": (lambda: jna.na2d_qk(_z(1, 8, 9, 3, 8), K2, 3), "heads", None),
    "qk_rank": (lambda: jna.na1d_qk(Q2, K2, 3), "q", None),
    "qk_k_dtype": (lambda: jna.na2d_qk(Q2, K2.astype(jnp.bfloat16), 3), "k", None),
    "av_slots": (lambda: jna.na2d_av(_z(1, 8, 9, 4, 8), V2, 3), "attn", None),
    "av_attn_dtype": (lambda: jna.na2d_av(A2.astype(jnp.int32), V2, 3), "attn", None),
    "av_attn_half_f32_v": (lambda: jna.na2d_av(A2.astype(jnp.bfloat16), V2, 3), "attn", None),
    "av_heads": (lambda: jna.na2d_av(_z(1, 8, 9, 3, 9), V2, 3), "heads", None),
    "av_spatial": (lambda: jna.na2d_av(A2, _z(1, 8, 8, 2, 6), 3), "v", 1),
    "av_rank": (lambda: jna.na3d_av(A2, V2, 3), "attn", None),
    "av_stride_axis": (lambda: jna.na2d_av(A2, V2, 3, stride=(1, 4)), "stride", 1),
}


@pytest.mark.parametrize("case", list(NOT_IMPLEMENTED))
def test_rpb_unsupported_is_not_implemented(case):
    with pytest.raises(NotImplementedError) as e:
        NOT_IMPLEMENTED[case]()
    assert_names(e.value, "rpb")


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_value_error_naming_argument(case):
    call, name, axis = BAD[case]
    with pytest.raises(ValueError) as e:
        call()
    assert_names(e.value, name, axis)


def test_rank_dispatch_and_jit():
    """neighborhood_attention_qk/av take the rank from the input; jit with static window args."""
    case = CASES["1d"]
    q, k, v, rpb, attn, _, _ = _inputs(case, jnp.float32, seed=6)
    table = case.table()
    index = oracle.rpb_table(case.shape, case.kernel_size, case.dilation)
    f = jax.jit(functools.partial(jna.neighborhood_attention_qk, **case.window()))
    assert_abs(f(q, k, rpb=rpb), oracle.qk(f64(q), f64(k), table, None, f64(rpb), index), 1e-4, "qk")
    g = jax.jit(jna.neighborhood_attention_av, static_argnames=("kernel_size", "stride", "dilation",
                                                                 "is_causal"))
    assert_abs(g(attn, v, **case.window()), oracle.av(f64(attn), f64(v), table), 1e-4, "av")


# ---- Flax modules with rel_pos_bias --------------------------------------------------------------

MODULES = {1: jna.NeighborhoodAttention1D, 2: jna.NeighborhoodAttention2D,
           3: jna.NeighborhoodAttention3D}
MODULE_SETUPS = {
    1: ((11,), dict(num_heads=2, kernel_size=5, dilation=2)),
    2: ((6, 7), dict(num_heads=2, kernel_size=(3, 4), qk_scale=0.3)),
    3: ((4, 5, 3), dict(num_heads=2, kernel_size=(2, 3, 3), dilation=(2, 1, 1), qkv_bias=False)),
}
C = 8


@pytest.fixture
def _exact_float32_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def _module(rank, seed=0):
    shape, kwargs = MODULE_SETUPS[rank]
    module = MODULES[rank](**kwargs, rel_pos_bias=True)
    x = jax.random.normal(jax.random.key(seed), (2, *shape, C), jnp.float32)
    params = module.init(jax.random.key(seed + 1), x)
    return module, kwargs, x, params


def _hand_module(params, x, kwargs, rank):
    """float64: qkv Dense -> oracle qk (+ rpb) -> softmax -> oracle av -> proj Dense."""
    p = jax.tree.map(f64, params["params"])
    x = f64(x)
    heads = kwargs["num_heads"]
    qkv = (x @ p["qkv"]["kernel"] + p["qkv"].get("bias", 0.0)).reshape(*x.shape[:-1], 3, heads, -1)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    shape = x.shape[1:-1]
    ks = oracle.per_axis(kwargs["kernel_size"], rank)
    dl = oracle.per_axis(kwargs.get("dilation", 1), rank)
    table = oracle.slot_table(shape, ks, 1, dl, False)
    logits = oracle.qk(q, k, table, kwargs.get("qk_scale"), p["rpb"], oracle.rpb_table(shape, ks, dl))
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    a = oracle.av(w, v, table).reshape(*x.shape[:-1], C)
    return a @ p["proj"]["kernel"] + p["proj"]["bias"]


@pytest.mark.parametrize("rank", [pytest.param(1, marks=pytest.mark.slow), 2,
                                  pytest.param(3, marks=pytest.mark.slow)])
def test_module_rel_pos_bias_param_and_output(rank, _exact_float32_matmuls):
    """rel_pos_bias=True adds a param rpb [heads, 2K-1, ...]; the output equals the float64
    chain with the bias from the params; gradients reach rpb (checked nonzero and finite)."""
    module, kwargs, x, params = _module(rank, seed=rank)
    ks = oracle.per_axis(kwargs["kernel_size"], rank)
    rpb = params["params"]["rpb"]
    assert rpb.shape == (kwargs["num_heads"], *(2 * k - 1 for k in ks)) and rpb.dtype == jnp.float32
    # Make the bias large enough to matter, then compare.
    params = jax.tree.map(lambda a: a, params)
    params["params"]["rpb"] = jax.random.normal(jax.random.key(9), rpb.shape)
    assert_abs(jax.jit(module.apply)(params, x), _hand_module(params, x, kwargs, rank), 1e-4,
               "module out")
    g = jax.jit(jax.grad(lambda prm: jnp.sum(module.apply(prm, x) ** 2)))(params)["params"]["rpb"]
    assert g.shape == rpb.shape and np.all(np.isfinite(g)) and np.any(np.asarray(g) != 0)


def test_module_rpb_gradient_against_oracle(_exact_float32_matmuls):
    """d<out, dy>/d rpb equals the float64 chain rule (oracle backward through softmax)."""
    rank = 2
    module, kwargs, x, params = _module(rank, seed=7)
    dy = jax.random.normal(jax.random.key(8), x.shape)
    g = jax.jit(jax.grad(lambda prm: jnp.sum(module.apply(prm, x) * dy)))(params)["params"]["rpb"]
    # Hand chain: out = proj(av(softmax(logits))) -> dlogits -> drpb.
    p = jax.tree.map(f64, params["params"])
    xf = f64(x)
    heads = kwargs["num_heads"]
    qkv = (xf @ p["qkv"]["kernel"] + p["qkv"]["bias"]).reshape(*xf.shape[:-1], 3, heads, -1)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    shape, ks = xf.shape[1:-1], kwargs["kernel_size"]
    table, index = oracle.slot_table(shape, ks), oracle.rpb_table(shape, ks)
    logits = oracle.qk(q, k, table, kwargs["qk_scale"], p["rpb"], index)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    da = (f64(dy) @ p["proj"]["kernel"].T).reshape(*xf.shape[:-1], heads, -1)
    dw, _ = oracle.av_bwd(w, v, table, da)
    dlogits = w * (dw - (dw * w).sum(-1, keepdims=True))
    _, _, want = oracle.qk_bwd(q, k, table, dlogits, kwargs["qk_scale"], p["rpb"].shape, index)
    assert_abs(g, want, 1e-3, "drpb")


def test_rpb_init_like_natten():
    """rpb_init: mean 0, std 0.02 (NATTEN 0.17's trunc_normal_(std=.02, a=-2, b=2))."""
    sample = np.asarray(jna.nn.rpb_init(jax.random.key(0), (16, 25, 25)))
    assert abs(sample.mean()) < 0.002 and 0.019 < sample.std() < 0.021
    assert np.abs(sample).max() <= 2.0
    module, _, _, params = _module(2)
    assert 0.01 < float(jnp.std(params["params"]["rpb"])) < 0.03


def test_module_rel_pos_bias_causal_is_not_implemented():
    module = jna.NeighborhoodAttention1D(num_heads=2, kernel_size=3, is_causal=True, rel_pos_bias=True)
    with pytest.raises(NotImplementedError):
        module.init(jax.random.key(0), jnp.zeros((1, 8, 8)))


# ---- Triton lowering without a GPU ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_lower_to_triton_for_cuda(dtype, monkeypatch):
    """Every unfused kernel (forward and backward, QK with rpb, AV) lowers to Triton IR for an
    sm90 GPU, cross-lowered from this machine with `jax.export` (Triton rejects what interpret
    mode accepts, e.g. non-power-of-two tensor shapes). Compiling the IR to PTX still needs the
    GPU. Uses two private hooks: the GPU-info query (`jna._src.compat.triton_lowering_for_cuda`) and
    the backend's interpret switch."""
    from jax import export

    from jna._src import compat
    from jna.backends.triton import unfused as unfused

    monkeypatch.setattr(unfused, "_interpret", lambda: False)
    spec = jax.ShapeDtypeStruct
    window = dict(kernel_size=(5, 7), stride=(1, 2), dilation=(2, 1), is_causal=(False, True))
    q, k, v = spec((2, 20, 24, 4, 24), dtype), spec((2, 20, 24, 2, 24), dtype), spec((2, 20, 24, 2, 40), dtype)
    na = lambda q, k, v: jna.na2d(q, k, v, **window, backend="unfused").astype(jnp.float32).sum()
    qk = lambda q, k, r: jna.na1d_qk(q, k, 17, rpb=r).sum()
    av = lambda a, v: jna.na1d_av(a, v, 17, dilation=2).astype(jnp.float32).sum()
    calls = {
        "na2d fwd+bwd": (jax.value_and_grad(na, argnums=(0, 1, 2)), (q, k, v)),
        "na1d_qk rpb fwd+bwd": (jax.value_and_grad(qk, argnums=(0, 1, 2)),
                                (spec((1, 300, 4, 64), dtype), spec((1, 300, 2, 64), dtype),
                                 spec((4, 33), jnp.float32))),
        "na1d_av fwd+bwd": (jax.value_and_grad(av, argnums=(0, 1)),
                            (spec((1, 300, 4, 17), jnp.float32), spec((1, 300, 1, 8), dtype))),
    }
    triton = "__gpu$xla.gpu.triton"
    for name, (fn, args) in calls.items():
        with compat.triton_lowering_for_cuda(90):
            exported = export.export(jax.jit(fn), platforms=["cuda"],
                                     disabled_checks=[export.DisabledSafetyCheck.custom_call(triton)])(*args)
        assert exported.mlir_module().count(triton) >= 3, name


# ---- GPU: larger problems against the reference backend ------------------------------------------

GPU_CASES = {
    "1d": ((2048,), 129, 1, 1, False, 4, 2, 64, 64),
    "1d-causal": ((1500,), 64, 4, 3, True, 2, 2, 128, 128),
    "2d": ((48, 64), (13, 9), (1, 1), (1, 2), (False, False), 4, 4, 64, 32),
    "2d-causal-strided": ((40, 40), 8, (2, 1), 1, (True, False), 2, 1, 32, 32),
    "3d": ((10, 12, 16), (5, 3, 7), (1, 2, 3), (2, 1, 1), (False, True, False), 2, 2, 32, 32),
}


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="GPU-only large-shape checks")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", sorted(GPU_CASES))
def test_gpu_unfused_against_reference(case, dtype):
    """backend="unfused" of na*d (QK -> softmax -> AV) vs the reference backend: out, lse and
    q/k/v gradients; and the rpb gradient of na*d_qk vs jax autodiff of a gather formula."""
    shape, ks, st, dl, ca, heads, kv_heads, dim, vdim = GPU_CASES[case]
    keys = jax.random.split(jax.random.key(sorted(GPU_CASES).index(case)), 5)
    q = jax.random.normal(keys[0], (2, *shape, heads, dim), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (2, *shape, kv_heads, dim), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (2, *shape, kv_heads, vdim), jnp.float32).astype(dtype)
    dout = jax.random.normal(keys[3], (2, *shape, heads, vdim), jnp.float32)
    dlse = jax.random.normal(keys[4], (2, *shape, heads), jnp.float32)

    def run(backend, q, k, v):
        fn = functools.partial(jna.neighborhood_attention, kernel_size=ks, stride=st, dilation=dl,
                               is_causal=ca, return_lse=True, backend=backend)
        (out, lse), vjp = jax.vjp(fn, q, k, v)
        return out, lse, vjp((dout.astype(out.dtype), dlse))

    out, lse, grads = jax.jit(functools.partial(run, "unfused"))(q, k, v)
    up = lambda x: x.astype(jnp.float32)
    r_out, r_lse, r_grads = jax.jit(functools.partial(run, "reference"))(up(q), up(k), up(v))
    assert np.all(np.isfinite(np.asarray(up(out))))
    rel = lambda a, b: float(np.linalg.norm(np.asarray(up(a), np.float64) - np.asarray(b))
                             / np.linalg.norm(np.asarray(b, np.float64)))
    if dtype == jnp.float32:
        np.testing.assert_allclose(out, r_out, atol=1e-4, rtol=0)
        np.testing.assert_allclose(lse, r_lse, atol=1e-4, rtol=0)
        for name, g, r in zip("qkv", grads, r_grads):
            np.testing.assert_allclose(g, r, atol=1e-3, rtol=0, err_msg=f"d{name}")
    else:
        assert rel(out, r_out) <= 1e-2
        np.testing.assert_allclose(lse, r_lse, atol=2e-2, rtol=0)
        for name, g, r in zip("qkv", grads, r_grads):
            assert rel(g, r) <= 1e-2, f"d{name}: {rel(g, r)}"

    if any(np.atleast_1d(ca)) or any(np.atleast_1d(st) != 1):
        return
    # rpb on the GPU: logits with bias minus logits without bias is the gathered bias, and the
    # bias gradient equals autodiff of jna.qk_av.relative_position_bias (pure jax gather).
    kk = tuple(np.broadcast_to(ks, (len(shape),)))
    rpb = jax.random.normal(keys[4], (heads, *(2 * k_ - 1 for k_ in kk)), jnp.float32)
    qk = functools.partial(jna.neighborhood_attention_qk, kernel_size=ks, stride=st, dilation=dl)
    dlog = jax.random.normal(keys[3], (2, *shape, heads, math.prod(kk)), jnp.float32)
    with_bias, vjp = jax.vjp(lambda r: qk(q, k, rpb=r), rpb)
    (drpb,) = vjp(dlog)
    params = jna.semantics.normalize_params(shape, ks, st, dl, ca)
    bias, vjp_b = jax.vjp(lambda r: jna.qk_av.relative_position_bias(r, params), rpb)
    np.testing.assert_allclose(with_bias - qk(q, k), jnp.broadcast_to(bias, with_bias.shape),
                               atol=1e-4, rtol=0)
    (want,) = vjp_b(dlog.sum(0))
    np.testing.assert_allclose(drpb, want, atol=1e-2, rtol=1e-5)
