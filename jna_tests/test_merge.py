"""`jna.merge_attentions`: merging attentions over disjoint key sets through the logsumexp.

Partial attentions over disjoint key sets, merged, must equal the float64 oracle's attention
over the union (out and lse), for two and three parts; gradients flowing through the merge into
q and every part's k/v must equal the oracle's backward over the union; bad shapes raise.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jna
from jna_tests import oracle
from jna_tests.common import assert_abs, f64

B, X, H, H_KV, D, DV = 2, (3, 4), 4, 2, 8, 5
SPLITS = {"two": (7, 5), "three": (3, 6, 2)}


def _inputs(sizes, seed):
    rng = np.random.default_rng(seed)
    r = lambda *s: jnp.asarray(rng.standard_normal(s, dtype=np.float32))
    q = r(B, *X, H, D)
    ks = [r(B, n, H_KV, D) for n in sizes]
    vs = [r(B, n, H_KV, DV) for n in sizes]
    return q, ks, vs, r(B, *X, H, DV), r(B, *X, H)


def _union_oracle(q, ks, vs):
    k, v = np.concatenate([f64(a) for a in ks], 1), np.concatenate([f64(a) for a in vs], 1)
    mask = np.ones((int(np.prod(X)), k.shape[1]), bool)
    return k, v, mask


def _dense_part(q, k, v):
    """Plain float32 attention of every query over one key set, in jax (differentiable)."""
    g = H // H_KV
    kr, vr = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    s = jnp.einsum("bxyhd,bmhd->bxyhm", q, kr, precision="highest") * D ** -0.5
    lse = jax.nn.logsumexp(s, axis=-1)
    out = jnp.einsum("bxyhm,bmhd->bxyhd", jnp.exp(s - lse[..., None]), vr, precision="highest")
    return out, lse


@pytest.mark.parametrize("split", list(SPLITS))
def test_merge_equals_attention_over_union(split):
    """Oracle partials (cast to float32) merged by jna equal the oracle over the union."""
    q, ks, vs, _, _ = _inputs(SPLITS[split], seed=60)
    outs, lses = [], []
    for k, v in zip(ks, vs):
        o, l = oracle.attention(f64(q), f64(k), f64(v), np.ones((12, k.shape[1]), bool))
        outs.append(jnp.asarray(o, jnp.float32))
        lses.append(jnp.asarray(l, jnp.float32))
    out, lse = jna.merge_attentions(outs, lses)
    k, v, mask = _union_oracle(q, ks, vs)
    want_out, want_lse = oracle.attention(f64(q), k, v, mask)
    assert out.shape == want_out.shape and lse.shape == want_lse.shape
    assert_abs(out, want_out, 1e-5, "merged out")
    assert_abs(lse, want_lse, 1e-5, "merged lse")
    # Merging is symmetric in the parts.
    out_r, lse_r = jna.merge_attentions(outs[::-1], lses[::-1])
    assert_abs(out_r, want_out, 1e-5, "merged out (reversed order)")


@pytest.mark.parametrize("split", list(SPLITS))
def test_gradients_through_merge(split):
    """d/d(q, k_i, v_i) of <out, dout> + <lse, dlse> through the merge equals the oracle's
    backward over the union of the key sets."""
    q, ks, vs, dout, dlse = _inputs(SPLITS[split], seed=61)

    def f(q, ks, vs):
        parts = [_dense_part(q, k, v) for k, v in zip(ks, vs)]
        return jna.merge_attentions([p[0] for p in parts], [p[1] for p in parts])

    (out, lse), vjp = jax.vjp(f, q, ks, vs)
    dq, dks, dvs = vjp((dout, dlse))
    k, v, mask = _union_oracle(q, ks, vs)
    w_dq, w_dk, w_dv, _, _ = oracle.attention_bwd(f64(q), k, v, mask, f64(dout), f64(dlse))
    bounds = np.cumsum((0,) + SPLITS[split])
    assert_abs(dq, w_dq, 1e-3, "dq")
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        assert_abs(dks[i], w_dk[:, a:b], 1e-3, f"dk part {i}")
        assert_abs(dvs[i], w_dv[:, a:b], 1e-3, f"dv part {i}")


def test_merge_is_jittable_and_matches_eager():
    """merge_attentions works under jit (same oracle comparison)."""
    q, ks, vs, _, _ = _inputs(SPLITS["two"], seed=62)
    parts = [_dense_part(q, k, v) for k, v in zip(ks, vs)]
    out, lse = jax.jit(jna.merge_attentions)([p[0] for p in parts], [p[1] for p in parts])
    k, v, mask = _union_oracle(q, ks, vs)
    want_out, want_lse = oracle.attention(f64(q), k, v, mask)
    assert_abs(out, want_out, 1e-4, "jit merged out")
    assert_abs(lse, want_lse, 1e-4, "jit merged lse")


O, L = jnp.zeros((1, 3, 4, 2, 5)), jnp.zeros((1, 3, 4, 2))
BAD = {
    "output_shapes_differ": ([O, jnp.zeros((1, 3, 4, 2, 6))], [L, L]),
    "spatial_differs": ([O, jnp.zeros((1, 3, 5, 2, 5))], [L, jnp.zeros((1, 3, 5, 2))]),
    "lse_shape": ([O, O], [L, jnp.zeros((1, 3, 4, 3))]),
    "lse_with_value_axis": ([O, O], [L, jnp.zeros((1, 3, 4, 2, 5))]),
    "count_mismatch": ([O, O], [L]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_mismatched_shapes_raise(case):
    """Mismatched output/lse shapes or counts are a ValueError."""
    outs, lses = BAD[case]
    with pytest.raises(ValueError):
        jna.merge_attentions(outs, lses)
