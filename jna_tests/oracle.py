"""Float64 brute-force oracle for neighborhood attention, written from DESIGN.md section 1.

Deliberately independent of ``jna``: it does not import the library and re-derives the window
rule from the design text with plain Python integers, one query at a time. It builds the dense
``[N, N]`` boolean mask (N = number of tokens, row-major), then runs masked softmax attention in
float64 numpy. Also provides the hand-written backward pass (validated against jax autodiff in
``test_oracle.py``).

Shapes (heads-last, as in the library):
  q ``[B, *X, H, D]``, k ``[B, *X, H_kv, D]``, v ``[B, *X, H_kv, D_v]``,
  extra_k ``[B, N_extra, H_kv, D]``, extra_v ``[B, N_extra, H_kv, D_v]``,
  out ``[B, *X, H, D_v]``, lse ``[B, *X, H]``.
"""

from __future__ import annotations

import math

import numpy as np


def per_axis(value, rank):
    """An int/bool or a per-axis sequence -> a tuple of ``rank`` values."""
    if isinstance(value, (tuple, list)):
        assert len(value) == rank, (value, rank)
        return tuple(value)
    return (value,) * rank


def axis_allowed(x: int, y: int, L: int, K: int, s: int, d: int, causal: bool) -> bool:
    """DESIGN.md section 1, one axis: may query ``x`` attend key ``y``?"""
    if x % d != y % d:  # rule 1: same dilation group
        return False
    g = x % d
    xg, yg = x // d, y // d
    Lg = -(-(L - g) // d)  # ceil((L - g) / d)
    if causal:  # rule 3
        leader = min((xg // s) * s + s - 1, Lg - 1)
        return max(leader - K + 1, 0) <= yg <= xg
    leader = min((xg // s) * s + s // 2, Lg - 1)  # rule 2
    start = min(max(leader - K // 2, 0), Lg - K)
    return start <= yg < start + K


def axis_mask(L: int, K: int, s: int, d: int, causal: bool) -> np.ndarray:
    """``[L, L]`` boolean: ``mask[x, y]`` = query ``x`` may attend key ``y`` on this axis."""
    return np.array(
        [[axis_allowed(x, y, L, K, s, d, causal) for y in range(L)] for x in range(L)], dtype=bool
    )


def na_mask(shape, kernel_size, stride=1, dilation=1, is_causal=False) -> np.ndarray:
    """Dense ``[N, N]`` mask of NA over a row-major flattened map: the AND over axes."""
    shape = tuple(shape)
    rank = len(shape)
    ks, st, dl, ca = (per_axis(a, rank) for a in (kernel_size, stride, dilation, is_causal))
    coords = np.indices(shape).reshape(rank, -1)  # [rank, N], row-major token order
    mask = np.ones((coords.shape[1],) * 2, dtype=bool)
    for i in range(rank):
        m = axis_mask(shape[i], ks[i], st[i], dl[i], bool(ca[i]))
        mask &= m[coords[i][:, None], coords[i][None, :]]
    return mask


def _flatten(q, k, v):
    b, h, dim = q.shape[0], q.shape[-2], q.shape[-1]
    n = math.prod(q.shape[1:-2])
    return (
        np.asarray(q, np.float64).reshape(b, n, h, dim),
        np.asarray(k, np.float64).reshape(b, -1, k.shape[-2], k.shape[-1]),
        np.asarray(v, np.float64).reshape(b, -1, v.shape[-2], v.shape[-1]),
    )


def _keys(k, v, mask, extra_k, extra_v):
    """Local keys followed by the additional keys, and the mask widened to match."""
    if extra_k is None:
        return k, v, mask
    extra_k = np.asarray(extra_k, np.float64)
    extra_v = np.asarray(extra_v, np.float64)
    wide = np.concatenate([mask, np.ones((mask.shape[0], extra_k.shape[1]), bool)], axis=1)
    return np.concatenate([k, extra_k], 1), np.concatenate([v, extra_v], 1), wide


def _probs(q, k, mask, scale):
    """Per query head: logits, lse ``[B, H, N]`` and probabilities ``[B, H, N, Nk]``."""
    group = q.shape[2] // k.shape[2]
    kh = np.repeat(k, group, axis=2)  # query head h -> kv head h // group
    logits = scale * np.einsum("bqhd,bkhd->bhqk", q, kh)
    logits = np.where(mask[None, None], logits, -np.inf)
    m = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(-1)) + m[..., 0]
    return lse, np.exp(logits - lse[..., None]), group


def attention(q, k, v, mask, scale=None, extra_k=None, extra_v=None):
    """Masked softmax attention in float64 with GQA and optional additional keys/values.

    Args:
      q, k, v: ``[B, *X, H(_kv), D(_v)]`` arrays (any float dtype; computed in float64).
      mask: ``[N, N_k]`` boolean over the flattened maps (e.g. ``[N, N]`` from `na_mask`); the
        keys may form a different map than the queries (``k``: ``[B, *Y, H_kv, D]``).
      scale: defaults to ``D ** -0.5``.
      extra_k, extra_v: optional additional keys/values every query attends.

    Returns:
      ``(out [B, *X, H, D_v], lse [B, *X, H])`` in float64.
    """
    spatial = q.shape[1:-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = _flatten(q, k, v)
    k, v, mask = _keys(k, v, mask, extra_k, extra_v)
    lse, p, group = _probs(q, k, mask, scale)
    out = np.einsum("bhqk,bkhd->bqhd", p, np.repeat(v, group, axis=2))
    b, h = q.shape[0], q.shape[2]
    return out.reshape(b, *spatial, h, -1), lse.transpose(0, 2, 1).reshape(b, *spatial, h)


def attention_bwd(q, k, v, mask, dout, dlse, scale=None, extra_k=None, extra_v=None):
    """Hand-written float64 backward of `attention` for cotangents ``dout`` and ``dlse``.

    ``dS = P * (dP - rowsum(dO * O)) + dlse * P``, ``dQ = scale * dS K``,
    ``dK = scale * dS^T Q``, ``dV = P^T dO``, dK/dV summed over the query heads of a GQA group.

    Returns:
      ``(dq, dk, dv, d_extra_k, d_extra_v)`` (the last two ``None`` without additional keys).
    """
    spatial, k_spatial = q.shape[1:-2], k.shape[1:-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    n_local = math.prod(k_spatial)
    q, k, v = _flatten(q, k, v)
    k, v, mask = _keys(k, v, mask, extra_k, extra_v)
    lse, p, group = _probs(q, k, mask, scale)
    b, n, h, _ = q.shape
    h_kv = k.shape[2]
    vh, kh = np.repeat(v, group, axis=2), np.repeat(k, group, axis=2)
    do = np.asarray(dout, np.float64).reshape(b, n, h, -1)
    dl = np.asarray(dlse, np.float64).reshape(b, n, h).transpose(0, 2, 1)  # [B, H, N]
    out = np.einsum("bhqk,bkhd->bqhd", p, vh)
    dp = np.einsum("bqhd,bkhd->bhqk", do, vh)
    delta = np.einsum("bqhd,bqhd->bhq", do, out)
    ds = p * (dp - delta[..., None]) + dl[..., None] * p
    dq = scale * np.einsum("bhqk,bkhd->bqhd", ds, kh)
    dk = scale * np.einsum("bhqk,bqhd->bkhd", ds, q)
    dv = np.einsum("bhqk,bqhd->bkhd", p, do)
    # Sum over the query heads sharing a kv head (heads h_kv*group .. h_kv*group+group-1).
    dk = dk.reshape(b, -1, h_kv, group, dk.shape[-1]).sum(3)
    dv = dv.reshape(b, -1, h_kv, group, dv.shape[-1]).sum(3)
    dq = dq.reshape(b, *spatial, h, -1)
    dk_local = dk[:, :n_local].reshape(b, *k_spatial, h_kv, -1)
    dv_local = dv[:, :n_local].reshape(b, *k_spatial, h_kv, -1)
    if extra_k is None:
        return dq, dk_local, dv_local, None, None
    return dq, dk_local, dv_local, dk[:, n_local:], dv[:, n_local:]


def na(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
       extra_k=None, extra_v=None):
    """Oracle NA forward: ``(out, lse)`` in float64 for q/k/v ``[B, *X, H, D]``."""
    mask = na_mask(q.shape[1:-2], kernel_size, stride, dilation, is_causal)
    return attention(q, k, v, mask, scale, extra_k, extra_v)


def na_bwd(q, k, v, dout, dlse, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
           extra_k=None, extra_v=None):
    """Oracle NA backward: ``(dq, dk, dv, d_extra_k, d_extra_v)`` in float64."""
    mask = na_mask(q.shape[1:-2], kernel_size, stride, dilation, is_causal)
    return attention_bwd(q, k, v, mask, dout, dlse, scale, extra_k, extra_v)


def rel_l2(got, want) -> float:
    """Relative L2 error ``||got - want|| / ||want||`` in float64."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
