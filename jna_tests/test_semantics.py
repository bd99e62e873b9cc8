"""The window rule: oracle vs `jna.semantics`, invariants of the rule, and argument checks.

* `jna.semantics.key_allowed` (numpy and traced jnp) and `axis_neighbor_table` agree with the
  independent oracle on every valid (L, K, s, d, causal) for small L.
* Invariants of the rule (on the oracle mask): non-causal queries see exactly prod(K) keys;
  s = K is blocked attention; K = L is full attention; causal queries see themselves and nothing
  after themselves.
* The library end to end against formulations that do not use any mask: blocked attention by
  reshaping, full attention, dilation as NA on each dilation group.
* `normalize_params` validation messages.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jna import semantics
from jna_tests import oracle
from jna_tests.backends import float32_backends, tiered
from jna_tests.common import Config, assert_abs, assert_names, make_inputs, na_fn


def _valid_axis_params(L):
    for K in range(2, L + 1):
        for d in range(1, L // K + 1):
            for s in range(1, K + 1):
                for causal in (False, True):
                    yield K, s, d, causal


@pytest.mark.parametrize("L", list(range(2, 23)))
def test_key_allowed_matches_oracle(L):
    """Every valid (K, s, d, causal) on an axis of length L: same [L, L] mask."""
    x, y = np.arange(L)[:, None], np.arange(L)[None, :]
    for K, s, d, c in _valid_axis_params(L):
        want = oracle.axis_mask(L, K, s, d, c)
        got = np.broadcast_to(semantics.key_allowed(x, y, L, K, s, d, c), (L, L))
        assert np.array_equal(got, want), f"key_allowed L={L} K={K} s={s} d={d} causal={c}"


@pytest.mark.parametrize("L", [5, 11, 14])
def test_key_allowed_jnp_matches_oracle(L):
    """key_allowed with xp=jnp (as the reference backend and kernels use it) gives the oracle
    mask: every combo eagerly, and every 7th combo also traced inside jit."""
    x, y = jnp.arange(L)[:, None], jnp.arange(L)[None, :]
    for i, c in enumerate(_valid_axis_params(L)):
        want = oracle.axis_mask(L, *c)
        got = np.broadcast_to(semantics.key_allowed(x, y, L, *c, xp=jnp), (L, L))
        assert np.array_equal(got, want), (L, c)
        if i % 7 == 0:
            jitted = jax.jit(lambda a, b: semantics.key_allowed(a, b, L, *c, xp=jnp))
            assert np.array_equal(np.broadcast_to(jitted(x, y), (L, L)), want), ("jit", L, c)


@pytest.mark.parametrize("L", [4, 9, 16, 21])
def test_neighbor_table_matches_oracle(L):
    """axis_neighbor_table lists each query's allowed keys in increasing order, K slots."""
    for K, s, d, c in _valid_axis_params(L):
        params = semantics.normalize_params((L,), K, s, d, c)
        coords, valid = semantics.axis_neighbor_table(params, 0)
        assert coords.shape == valid.shape == (L, K)
        want = oracle.axis_mask(L, K, s, d, c)
        for x in range(L):
            got = list(coords[x][valid[x]])
            assert got == list(np.nonzero(want[x])[0]), (L, K, s, d, c, x)
            assert all(0 <= y < L for y in coords[x]), "invalid slots must stay in range"


def _random_configs(n, seed):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        rank = int(rng.integers(1, 4))
        shape = tuple(int(rng.integers(2, {1: 30, 2: 12, 3: 7}[rank])) for _ in range(rank))
        ks = tuple(int(rng.integers(2, L + 1)) for L in shape)
        dl = tuple(int(rng.integers(1, L // k + 1)) for L, k in zip(shape, ks))
        st = tuple(int(rng.integers(1, k + 1)) for k in ks)
        ca = tuple(bool(rng.integers(2)) for _ in shape)
        yield shape, ks, st, dl, ca


@pytest.mark.parametrize("seed", range(4))
def test_noncausal_sees_exactly_prod_k(seed):
    """Non-causal: every query sees prod(K) keys, all in its own dilation group."""
    for shape, ks, st, dl, _ in _random_configs(25, seed):
        m = oracle.na_mask(shape, ks, st, dl, False)
        assert (m.sum(1) == np.prod(ks)).all(), (shape, ks, st, dl)


@pytest.mark.parametrize("seed", range(4))
def test_causal_sees_itself_and_nothing_later(seed):
    """Every query attends itself; on a causal axis, no key with a larger coordinate."""
    for shape, ks, st, dl, ca in _random_configs(25, seed):
        m = oracle.na_mask(shape, ks, st, dl, ca)
        assert m.diagonal().all(), (shape, ks, st, dl, ca)
        coords = np.indices(shape).reshape(len(shape), -1)
        for i, c in enumerate(ca):
            if c:
                later = coords[i][None, :] > coords[i][:, None]
                assert not (m & later).any(), (shape, ks, st, dl, ca)
        assert (m.sum(1) <= np.prod(ks)).all()


@pytest.mark.parametrize("L,K", [(6, 2), (6, 3), (12, 4), (9, 9), (20, 5)])
def test_stride_equal_kernel_is_blocked(L, K):
    """s = K, L % K == 0: the mask is block-diagonal with K-token blocks (also per dilation)."""
    x = np.arange(L)
    np.testing.assert_array_equal(oracle.axis_mask(L, K, K, 1, False),
                                  x[:, None] // K == x[None, :] // K)


def test_kernel_equal_length_is_full_attention():
    """K = L non-causal: every query sees every key (any stride)."""
    for L in range(2, 15):
        for s in range(1, L + 1):
            assert oracle.axis_mask(L, L, s, 1, False).all(), (L, s)


# ---- library end to end vs mask-free formulations ----------------------------------------------


def _plain_attention(q, k, v, scale):
    """Full softmax attention over the last-but-two axis, float64 numpy, GQA by repeat."""
    g = q.shape[-2] // k.shape[-2]
    k, v = np.repeat(k, g, -2), np.repeat(v, g, -2)
    s = scale * np.einsum("...qhd,...khd->...hqk", q, k)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("...hqk,...khd->...qhd", p, v)


def _blocked_2d(q, k, v, bs, scale):
    """Attention within non-overlapping (bs0, bs1) blocks of a [B, X0, X1, H, D] map."""
    def split(a):
        b, x0, x1, h, d = a.shape
        a = a.reshape(b, x0 // bs[0], bs[0], x1 // bs[1], bs[1], h, d)
        return a.transpose(0, 1, 3, 2, 4, 5, 6).reshape(b, x0 // bs[0], x1 // bs[1], -1, h, d)
    out = _plain_attention(split(q), split(k), split(v), scale)
    b, x0, x1, h, _ = q.shape
    out = out.reshape(b, x0 // bs[0], x1 // bs[1], bs[0], bs[1], h, -1)
    return out.transpose(0, 1, 3, 2, 4, 5, 6).reshape(b, x0, x1, h, -1)


@pytest.mark.parametrize("backend", tiered(float32_backends()))
def test_library_blocked_equals_window_attention(backend):
    """na2d with stride = kernel_size and L % K == 0 equals attention within blocks."""
    cfg = Config((8, 9), (4, 3), (4, 3), (1, 1), (False, False), batch=2, heads=4, heads_kv=2,
                 dim=8, dim_v=6)
    inp = make_inputs(cfg, seed=11)
    out = na_fn(2)(inp.q, inp.k, inp.v, **cfg.na_kwargs(), backend=backend)
    f = lambda a: np.asarray(a, np.float64)
    want = _blocked_2d(f(inp.q), f(inp.k), f(inp.v), (4, 3), cfg.dim ** -0.5)
    assert_abs(out, want, 1e-4, "blocked out", cfg)


@pytest.mark.parametrize("backend", tiered(float32_backends()))
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_library_full_kernel_equals_self_attention(backend, rank):
    """K = L on every axis, non-causal: plain softmax attention over all tokens."""
    shape = {1: (11,), 2: (5, 6), 3: (3, 4, 3)}[rank]
    cfg = Config(shape, shape, (1,) * rank, (1,) * rank, (False,) * rank, heads=2, heads_kv=1,
                 dim=8, dim_v=4, scale=0.4)
    inp = make_inputs(cfg, seed=12)
    out = na_fn(rank)(inp.q, inp.k, inp.v, **cfg.na_kwargs(), scale=0.4, backend=backend)
    f = lambda a: np.asarray(a, np.float64).reshape(1, -1, *a.shape[-2:])
    want = _plain_attention(f(inp.q), f(inp.k), f(inp.v), 0.4).reshape(out.shape)
    assert_abs(out, want, 1e-4, "full-attention out", cfg)


@pytest.mark.parametrize("backend", tiered(float32_backends()))
@pytest.mark.parametrize("causal", [False, True])
def test_library_dilation_is_na_on_each_group(backend, causal):
    """Dilation d = NA with the same K, s on each sub-map x[g::d] (computed by the library)."""
    d, K, s = (3, 2), (3, 2), (2, 1)  # equal group shapes (4, 4): one compile for all groups
    cfg = Config((12, 8), K, s, d, (causal, False), heads=2, heads_kv=2, dim=4, dim_v=4)
    inp = make_inputs(cfg, seed=13)
    fn = na_fn(2)
    out = np.asarray(fn(inp.q, inp.k, inp.v, **cfg.na_kwargs(), backend=backend))
    for g0, g1 in itertools.product(range(d[0]), range(d[1])):
        sub = lambda a: a[:, g0::d[0], g1::d[1]]
        want = fn(sub(inp.q), sub(inp.k), sub(inp.v), kernel_size=K, stride=s,
                  is_causal=(causal, False), backend=backend)
        assert_abs(sub(out), want, 1e-5, f"group ({g0},{g1})", cfg)


# ---- normalize_params --------------------------------------------------------------------------


def test_normalize_params_normalizes():
    """Scalars broadcast to per-axis tuples; tuples pass through."""
    p = semantics.normalize_params((10, 12), 3, (1, 2), 2, (True, False))
    assert (p.spatial_shape, p.kernel_size, p.stride, p.dilation, p.is_causal) == (
        (10, 12), (3, 3), (1, 2), (2, 2), (True, False))
    assert p.window_size == 9 and p.num_tokens == 120 and p.rank == 2


BAD_PARAMS = [
    # (kwargs over a (10, 12) map, the argument the message must name, the axis or None)
    (dict(kernel_size=(3, 1)), "kernel_size", 1),
    (dict(kernel_size=(11, 3)), "kernel_size", 0),
    (dict(kernel_size=(3, 5), dilation=(1, 3)), "dilation", 1),
    (dict(kernel_size=3, stride=(1, 4)), "stride", 1),
    (dict(kernel_size=3, stride=(0, 1)), "stride", 0),
    (dict(kernel_size=3, dilation=(1, 0)), "dilation", 1),
    (dict(kernel_size=(3, 3, 3)), "kernel_size", None),
    (dict(kernel_size=3, stride=(1,)), "stride", None),
    (dict(kernel_size=3.0), "kernel_size", None),
    (dict(kernel_size=(3, 3.0)), "kernel_size", 1),
    (dict(kernel_size=True), "kernel_size", None),
    (dict(kernel_size=3, dilation=(1, True)), "dilation", 1),
    (dict(kernel_size=3, is_causal=1), "is_causal", None),
    (dict(kernel_size=3, is_causal=(False, 0)), "is_causal", 1),
    (dict(kernel_size=3, is_causal=(False,)), "is_causal", None),
]


@pytest.mark.parametrize("kwargs,name,axis", BAD_PARAMS, ids=lambda x: str(x))
def test_normalize_params_rejects(kwargs, name, axis):
    """Each broken rule is a ValueError naming the argument (and the axis when per-axis)."""
    with pytest.raises(ValueError) as e:
        semantics.normalize_params((10, 12), **kwargs)
    assert_names(e.value, name, axis)
