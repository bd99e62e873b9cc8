"""Checks of the oracle itself, so that the rest of the suite can trust it.

* The window rule against tables derived by hand from the rule in docs/semantics.md.
* The float64 forward and the hand-written backward against jax autodiff of a separately
  written dense masked-softmax formula, run in float64 (``jax.enable_x64``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jna_tests import oracle
from jna_tests.common import Config, make_inputs, f64

# (L, K, s, d, causal) -> the keys each query x = 0..L-1 may attend, worked out by hand.
HAND_TABLES = {
    (7, 3, 1, 1, False): [[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, 6],
                          [4, 5, 6]],
    # even K: K//2 = 2 keys left of the leader, 1 right
    (6, 4, 1, 1, False): [[0, 1, 2, 3]] * 3 + [[1, 2, 3, 4], [2, 3, 4, 5], [2, 3, 4, 5]],
    # dilation 2: groups {0,2,4,6} and {1,3,5,7}
    (8, 3, 1, 2, False): [[0, 2, 4], [1, 3, 5], [0, 2, 4], [1, 3, 5], [2, 4, 6], [3, 5, 7],
                          [2, 4, 6], [3, 5, 7]],
    # dilation 3 on L=8: groups {0,3,6} (Lg 3), {1,4,7} (Lg 3), {2,5} (Lg 2)
    (8, 2, 1, 3, False): [[0, 3], [1, 4], [2, 5], [0, 3], [1, 4], [2, 5], [3, 6], [4, 7]],
    # stride 2, K 4: leader = (x//2)*2 + 1 clipped to 7, start = clamp(leader - 2, 0, 4)
    (8, 4, 2, 1, False): [[0, 1, 2, 3]] * 2 + [[1, 2, 3, 4]] * 2 + [[3, 4, 5, 6]] * 2
                         + [[4, 5, 6, 7]] * 2,
    # blocked: s = K = 3 on L = 7, the last partial block borrows from the left
    (7, 3, 3, 1, False): [[0, 1, 2]] * 3 + [[3, 4, 5]] * 3 + [[4, 5, 6]],
    (6, 3, 1, 1, True): [[0], [0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5]],
    # causal stride 2: leader = (x//2)*2 + 1 clipped to 5, keys max(leader-2, 0) .. x
    (6, 3, 2, 1, True): [[0], [0, 1], [1, 2], [1, 2, 3], [3, 4], [3, 4, 5]],
    # causal dilation 2 on L = 5: groups {0,2,4}, {1,3}
    (5, 2, 1, 2, True): [[0], [1], [0, 2], [1, 3], [2, 4]],
}


@pytest.mark.parametrize("key", list(HAND_TABLES), ids=str)
def test_axis_mask_matches_hand_tables(key):
    """The oracle's per-axis rule gives exactly the hand-derived key lists."""
    L = key[0]
    mask = oracle.axis_mask(*key)
    got = [list(np.nonzero(mask[x])[0]) for x in range(L)]
    assert got == HAND_TABLES[key]


def test_na_mask_is_and_over_axes():
    """A 2-D mask entry is the product of the two axis masks at the row-major coordinates."""
    shape, ks, st, dl, ca = (5, 7), (3, 4), (1, 2), (1, 1), (True, False)
    m = oracle.na_mask(shape, ks, st, dl, ca)
    a0, a1 = (oracle.axis_mask(shape[i], ks[i], st[i], dl[i], ca[i]) for i in range(2))
    want = np.einsum("ac,bd->abcd", a0, a1).reshape(35, 35)
    np.testing.assert_array_equal(m, want)


def _dense_jax(q, k, v, ek, ev, mask, scale):
    """Dense masked attention in jax (float64 under enable_x64), written independently."""
    b, h, dv, spatial = q.shape[0], q.shape[-2], v.shape[-1], q.shape[1:-2]
    n, hkv = mask.shape[0], k.shape[-2]
    q, k, v = q.reshape(b, n, h, -1), k.reshape(b, n, hkv, -1), v.reshape(b, n, hkv, dv)
    if ek is not None:
        k, v = jnp.concatenate([k, ek], 1), jnp.concatenate([v, ev], 1)
        mask = jnp.concatenate([mask, jnp.ones((n, ek.shape[1]), bool)], 1)
    g = h // hkv
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    s = scale * jnp.einsum("bnhd,bmhd->bhnm", q, k)
    s = jnp.where(mask, s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    out = jnp.einsum("bhnm,bmhd->bnhd", jnp.exp(s - lse[..., None]), v)
    return out.reshape(b, *spatial, h, dv), lse.transpose(0, 2, 1).reshape(b, *spatial, h)


CASES = [
    Config((9,), (4,), (2,), (2,), (False,), batch=2, heads=4, heads_kv=2, dim=6, dim_v=5),
    Config((5, 6), (3, 2), (1, 2), (1, 3), (True, False), heads=3, heads_kv=1, dim=4, dim_v=7,
           n_extra=3, scale=0.7),
    Config((4, 3, 5), (2, 3, 2), (2, 1, 1), (2, 1, 2), (False, True, True), heads=2,
           heads_kv=2, dim=5, dim_v=3, n_extra=2),
]


@pytest.mark.parametrize("cfg", CASES, ids=Config.short)
def test_oracle_fwd_bwd_match_jax_autodiff_float64(cfg):
    """Oracle out/lse and hand-written dq/dk/dv (+extras) equal float64 jax autodiff."""
    inp = make_inputs(cfg, seed=3)
    args = [f64(a) for a in (inp.q, inp.k, inp.v, inp.extra_k, inp.extra_v)]
    dout, dlse = f64(inp.dout), f64(inp.dlse)
    mask = oracle.na_mask(cfg.shape, **cfg.na_kwargs())
    scale = cfg.dim ** -0.5 if cfg.scale is None else cfg.scale
    with jax.enable_x64(True):
        jargs = [None if a is None else jnp.asarray(a, jnp.float64) for a in args]
        f = lambda *a: _dense_jax(*a, jnp.asarray(mask), scale)
        (out, lse), vjp = jax.vjp(f, *jargs)
        assert out.dtype == jnp.float64
        grads = vjp((jnp.asarray(dout), jnp.asarray(dlse)))
        want_fwd = [np.asarray(out), np.asarray(lse)]
        want_bwd = [None if g is None else np.asarray(g) for g in grads]
    got_fwd = oracle.na(*args[:3], **cfg.na_kwargs(), scale=cfg.scale, extra_k=args[3],
                        extra_v=args[4])
    got_bwd = oracle.na_bwd(*args[:3], dout, dlse, **cfg.na_kwargs(), scale=cfg.scale,
                            extra_k=args[3], extra_v=args[4])
    for name, g, w in zip(["out", "lse"], got_fwd, want_fwd):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12, err_msg=name)
    for name, g, w in zip(["dq", "dk", "dv", "dek", "dev"], got_bwd, want_bwd):
        assert (g is None) == (w is None), name
        if w is not None:
            assert np.abs(w).max() > 1e-3, f"{name} is trivially small"
            np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12, err_msg=name)
