"""Float64 brute-force oracle for neighborhood attention, written from the rule in docs/semantics.md ("One axis").

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
    """docs/semantics.md, one axis: may query ``x`` attend key ``y``?"""
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


def _wide_bias(bias, n_keys):
    """A ``[H, N, N_local]`` bias widened with zero columns for the additional keys."""
    bias = np.asarray(bias, np.float64)
    extra = n_keys - bias.shape[2]
    return np.concatenate([bias, np.zeros((*bias.shape[:2], extra))], axis=2) if extra else bias


def _probs(q, k, mask, scale, bias=None):
    """Per query head: logits, lse ``[B, H, N]`` and probabilities ``[B, H, N, Nk]``."""
    group = q.shape[2] // k.shape[2]
    kh = np.repeat(k, group, axis=2)  # query head h -> kv head h // group
    logits = scale * np.einsum("bqhd,bkhd->bhqk", q, kh)
    if bias is not None:  # after scaling; the additional keys get none
        logits = logits + _wide_bias(bias, k.shape[1])[None]
    logits = np.where(mask[None, None], logits, -np.inf)
    m = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(-1)) + m[..., 0]
    return lse, np.exp(logits - lse[..., None]), group


def attention(q, k, v, mask, scale=None, extra_k=None, extra_v=None, bias=None):
    """Masked softmax attention in float64 with GQA and optional additional keys/values.

    Args:
      q, k, v: ``[B, *X, H(_kv), D(_v)]`` arrays (any float dtype; computed in float64).
      mask: ``[N, N_k]`` boolean over the flattened maps (e.g. ``[N, N]`` from `na_mask`); the
        keys may form a different map than the queries (``k``: ``[B, *Y, H_kv, D]``).
      scale: defaults to ``D ** -0.5``.
      extra_k, extra_v: optional additional keys/values every query attends.
      bias: optional ``[H, N, N_k]`` added to the scaled logits of the map's keys (e.g. `rpb_dense`);
        the additional keys get no bias.

    Returns:
      ``(out [B, *X, H, D_v], lse [B, *X, H])`` in float64.
    """
    spatial = q.shape[1:-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = _flatten(q, k, v)
    k, v, mask = _keys(k, v, mask, extra_k, extra_v)
    lse, p, group = _probs(q, k, mask, scale, bias)
    out = np.einsum("bhqk,bkhd->bqhd", p, np.repeat(v, group, axis=2))
    b, h = q.shape[0], q.shape[2]
    return out.reshape(b, *spatial, h, -1), lse.transpose(0, 2, 1).reshape(b, *spatial, h)


def attention_bwd(q, k, v, mask, dout, dlse, scale=None, extra_k=None, extra_v=None, bias=None):
    """Hand-written float64 backward of `attention` for cotangents ``dout`` and ``dlse``.

    ``dS = P * (dP - rowsum(dO * O)) + dlse * P``, ``dQ = scale * dS K``,
    ``dK = scale * dS^T Q``, ``dV = P^T dO``, dK/dV summed over the query heads of a GQA group;
    with a ``bias``, ``dBias = sum over the batch of dS`` (the map's keys only).

    Returns:
      ``(dq, dk, dv, d_extra_k, d_extra_v)`` (the last two ``None`` without additional keys),
      and ``d_bias [H, N, N_local]`` as a sixth entry when ``bias`` is given.
    """
    spatial, k_spatial = q.shape[1:-2], k.shape[1:-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    n_local = math.prod(k_spatial)
    q, k, v = _flatten(q, k, v)
    k, v, mask = _keys(k, v, mask, extra_k, extra_v)
    lse, p, group = _probs(q, k, mask, scale, bias)
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
    grads = (dq, dk_local, dv_local, None, None) if extra_k is None else (
        dq, dk_local, dv_local, dk[:, n_local:], dv[:, n_local:])
    if bias is None:
        return grads
    return (*grads, ds.sum(0)[:, :, :n_local])


def na(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
       extra_k=None, extra_v=None, rpb=None):
    """Oracle NA forward: ``(out, lse)`` in float64 for q/k/v ``[B, *X, H, D]``; with ``rpb``
    ``[H, 2K_1 - 1, ...]`` (non-causal, stride 1) the relative positional bias of `rpb_dense`."""
    shape = q.shape[1:-2]
    mask = na_mask(shape, kernel_size, stride, dilation, is_causal)
    bias = None if rpb is None else rpb_dense(rpb, shape, kernel_size, dilation)
    return attention(q, k, v, mask, scale, extra_k, extra_v, bias)


def na_bwd(q, k, v, dout, dlse, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
           extra_k=None, extra_v=None, rpb=None):
    """Oracle NA backward: ``(dq, dk, dv, d_extra_k, d_extra_v)`` in float64, and ``d_rpb``
    (``rpb``'s shape) as a sixth entry when ``rpb`` is given."""
    shape = q.shape[1:-2]
    mask = na_mask(shape, kernel_size, stride, dilation, is_causal)
    if rpb is None:
        return attention_bwd(q, k, v, mask, dout, dlse, scale, extra_k, extra_v)
    bias = rpb_dense(rpb, shape, kernel_size, dilation)
    *grads, dbias = attention_bwd(q, k, v, mask, dout, dlse, scale, extra_k, extra_v, bias)
    return (*grads, rpb_dense_grad(dbias, np.shape(rpb), shape, kernel_size, dilation))


def rel_l2(got, want) -> float:
    """Relative L2 error ``||got - want|| / ||want||`` in float64."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


# ---- unfused ops (attention logits per window slot) ---------------------------------------------


def slot_table(shape, kernel_size, stride=1, dilation=1, is_causal=False):
    """``[N, prod(K)]`` int: flat key index of each (query, window slot), ``-1`` where masked.

    From the rule above, per axis: a query's allowed keys in increasing order are its slots
    ``0, 1, ...`` (NATTEN's window order); a causal window holds fewer than ``K`` keys, its
    remaining slots are masked. Slots are row-major over the per-axis slots.
    """
    shape = tuple(shape)
    rank = len(shape)
    ks, st, dl, ca = (per_axis(a, rank) for a in (kernel_size, stride, dilation, is_causal))
    lists = [[[y for y in range(shape[a]) if axis_allowed(x, y, shape[a], ks[a], st[a], dl[a], bool(ca[a]))]
              for x in range(shape[a])] for a in range(rank)]
    n, kk = math.prod(shape), math.prod(ks)
    table = np.full((n, kk), -1, np.int64)
    queries = np.indices(shape).reshape(rank, -1).T
    slots = np.indices(ks).reshape(rank, -1).T
    for qi, x in enumerate(queries):
        for si, j in enumerate(slots):
            keys = [lists[a][x[a]][j[a]] if j[a] < len(lists[a][x[a]]) else None for a in range(rank)]
            if None not in keys:
                table[qi, si] = np.ravel_multi_index(keys, shape)
    return table


def rpb_table(shape, kernel_size, dilation=1):
    """``[N, prod(K)]`` int: flat index into ``rpb[h]`` (``[2K_1 - 1, ...]``) per (query, slot).

    NATTEN 0.17: per axis ``(y // d - x // d) + K - 1`` (non-causal, stride 1).
    """
    shape = tuple(shape)
    rank = len(shape)
    ks, dl = per_axis(kernel_size, rank), per_axis(dilation, rank)
    table = slot_table(shape, ks, 1, dl, False)
    queries = np.indices(shape).reshape(rank, -1).T
    out = np.zeros_like(table)
    for qi, x in enumerate(queries):
        ys = np.stack(np.unravel_index(table[qi], shape), axis=-1)  # [KK, rank]
        rel = [(ys[:, a] // dl[a]) - (x[a] // dl[a]) + ks[a] - 1 for a in range(rank)]
        out[qi] = np.ravel_multi_index(rel, [2 * k - 1 for k in ks])
    return out


def rpb_dense(rpb, shape, kernel_size, dilation=1):
    """``[H, N, N]`` float64: the bias of each (query, key) pair, ``rpb[h]`` at `rpb_table`'s index
    for the keys of the query's window (non-causal, stride 1), 0 for every other key."""
    table = slot_table(shape, kernel_size, 1, dilation, False)
    index = rpb_table(shape, kernel_size, dilation)
    flat = np.asarray(rpb, np.float64).reshape(np.shape(rpb)[0], -1)
    n = table.shape[0]
    dense = np.zeros((flat.shape[0], n, n))
    rows = np.repeat(np.arange(n), table.shape[1])
    dense[:, rows, table.ravel()] = flat[:, index.ravel()]  # window keys are distinct per query
    return dense


def rpb_dense_grad(dbias, rpb_shape, shape, kernel_size, dilation=1):
    """Adjoint of `rpb_dense`: ``d_rpb`` of shape ``rpb_shape`` from ``d_bias [H, N, N]`` (each
    table entry sums the cotangents of the (query, key) pairs at its relative offset)."""
    table = slot_table(shape, kernel_size, 1, dilation, False)
    index = rpb_table(shape, kernel_size, dilation)
    n = table.shape[0]
    rows = np.repeat(np.arange(n), table.shape[1])
    drpb = np.zeros((rpb_shape[0], math.prod(rpb_shape[1:])))
    np.add.at(drpb, (slice(None), index.ravel()), np.asarray(dbias)[:, rows, table.ravel()])
    return drpb.reshape(rpb_shape)


def qk(q, k, table, scale=None, rpb=None, rpb_index=None):
    """Logits ``[B, *X, H, KK]`` (float64, ``-inf`` where masked) from q/k ``[B, *X, H(_kv), D]``."""
    spatial = q.shape[1:-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, _ = _flatten(q, k, k)
    group = q.shape[2] // k.shape[2]
    kh = np.repeat(k, group, axis=2)
    kj = kh[:, np.maximum(table, 0)]  # [B, N, KK, H, D]
    logits = scale * np.einsum("bnhd,bnjhd->bnhj", q, kj)
    if rpb is not None:
        bias = np.asarray(rpb, np.float64).reshape(rpb.shape[0], -1)[:, rpb_index]  # [H, N, KK]
        logits = logits + bias.transpose(1, 0, 2)[None]
    logits = np.where(table[None, :, None, :] >= 0, logits, -np.inf)
    return logits.reshape(q.shape[0], *spatial, q.shape[2], -1)


def qk_bwd(q, k, table, dlogits, scale=None, rpb_shape=None, rpb_index=None):
    """Hand backward of `qk`: ``(dq, dk, drpb or None)``; masked slots carry no gradient."""
    spatial, k_shape = q.shape[1:-2], k.shape
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, _ = _flatten(q, k, k)
    b, n, h, _ = q.shape
    group = h // k.shape[2]
    dl = np.asarray(dlogits, np.float64).reshape(b, n, h, -1)
    dl = np.where(table[None, :, None, :] >= 0, dl, 0.0)
    kh = np.repeat(k, group, axis=2)
    dq = scale * np.einsum("bnhj,bnjhd->bnhd", dl, kh[:, np.maximum(table, 0)])
    dkh = np.zeros_like(kh)
    contrib = scale * np.einsum("bnhj,bnhd->bnjhd", dl, q)  # to key table[n, j]
    np.add.at(dkh, (slice(None), np.maximum(table, 0)), contrib)
    dk = dkh.reshape(b, -1, k.shape[2], group, q.shape[-1]).sum(3).reshape(k_shape)
    drpb = None
    if rpb_shape is not None:
        drpb = np.zeros((h, math.prod(rpb_shape[1:])))
        np.add.at(drpb, (slice(None), rpb_index), dl.sum(0).transpose(1, 0, 2))
        drpb = drpb.reshape(rpb_shape)
    return dq.reshape(b, *spatial, h, -1), dk, drpb


def av(attn, v, table):
    """``out [B, *X, H, D_v]`` = sum over slots of ``attn * v[key]``; masked slots ignored."""
    spatial = attn.shape[1:-2]
    b, h = attn.shape[0], attn.shape[-2]
    a = np.asarray(attn, np.float64).reshape(b, -1, h, attn.shape[-1])
    a = np.where(table[None, :, None, :] >= 0, a, 0.0)
    v = np.asarray(v, np.float64).reshape(b, -1, v.shape[-2], v.shape[-1])
    vh = np.repeat(v, h // v.shape[2], axis=2)
    out = np.einsum("bnhj,bnjhd->bnhd", a, vh[:, np.maximum(table, 0)])
    return out.reshape(b, *spatial, h, -1)


def av_bwd(attn, v, table, dout):
    """Hand backward of `av`: ``(dattn, dv)``; masked slots of dattn are 0."""
    v_shape = v.shape
    b, h = attn.shape[0], attn.shape[-2]
    a = np.asarray(attn, np.float64).reshape(b, -1, h, attn.shape[-1])
    a = np.where(table[None, :, None, :] >= 0, a, 0.0)
    v = np.asarray(v, np.float64).reshape(b, -1, v.shape[-2], v.shape[-1])
    group = h // v.shape[2]
    vh = np.repeat(v, group, axis=2)
    do = np.asarray(dout, np.float64).reshape(b, -1, h, v.shape[-1])
    dattn = np.einsum("bnhd,bnjhd->bnhj", do, vh[:, np.maximum(table, 0)])
    dattn = np.where(table[None, :, None, :] >= 0, dattn, 0.0)
    dvh = np.zeros_like(vh)
    np.add.at(dvh, (slice(None), np.maximum(table, 0)), np.einsum("bnhj,bnhd->bnjhd", a, do))
    dv = dvh.reshape(b, -1, v.shape[2], group, v.shape[-1]).sum(3).reshape(v_shape)
    return dattn.reshape(attn.shape), dv
