"""The forward-mode (JVP) kernel of fused-triton: the tangent of ``(out, lse)`` in one pass.

Given the forward's ``out`` and ``lse`` (so ``P = exp(S - lse)`` is exact per tile, no online
rescaling, as in the dQ kernel) and tangents ``tq, tk, tv`` of ``q, k, v``, per query ``i``:

    tS_ij  = scale (tq_i . k_j + q_i . tk_j)
    mu_i   = sum_j P_ij tS_ij                          (= the tangent of lse_i)
    tout_i = sum_j P_ij tS_ij v_j + sum_j P_ij tv_j - mu_i out_i

over the KV tiles of the query's window (the forward's visit list), flash style: the attention
weights are never written. With a relative positional bias ``b`` (``S = scale q.k + b``) and its
tangent ``tb``, both gathered per pair like the forward's bias (`fused._bias`), ``tS_ij`` gains
``tb_ij``: the bias enters linearly, after scaling. Per tile pair: S = Q K^T, Q tK^T + tQ K^T, (P o tS) V and P tV, five
products (the forward does two). How jna composes this with reverse mode is in
`jna._src.forward_mode`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jna.backends.triton.fused import (
    _LOG2E, _Specs, _Static, _add_bias, _bias, _bias_operands, _bias_part, _dot, _f32_products, _grid_batch,
    _load, _masked_probs, _own, _params, _put, _q_bias_part, _q_tile_program, _tables,
)


def _tangent_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, tq_ref, tk_ref, tv_ref, tab_ref, *refs,
                    st: _Static):
    """``refs``: with a bias, its table and its tangent's (one row each); then tout, tlse."""
    if st.bias:
        rpb_ref, trpb_ref, to_ref, tlse_ref = refs
    else:
        (to_ref, tlse_ref), rpb_ref = refs, None
    plan = st.plan
    f32 = _f32_products(st)
    tq_tokens, tk_tokens = plan.q_tile_tokens, plan.kv_tile_tokens
    geo, qt, k_local, spans, walk = _q_tile_program(st, tab_ref, "forward")
    qk_scale = st.scale * _LOG2E
    q_part = None if rpb_ref is None else _q_bias_part(st, geo, qt)

    q = _own(q_ref, st, "q", qt).reshape(tq_tokens, st.head_dim)
    tq = _own(tq_ref, st, "q", qt).reshape(tq_tokens, st.head_dim)
    lse2 = _own(lse_ref, st, "q", qt).reshape(tq_tokens) * _LOG2E  # base-2 logsumexp

    def body(i, carry):
        acc, mu = carry
        ko, tile, full = walk.visit(i)
        k, tk = (_load(r, st, "kv", ko, (*tile, slice(None))).reshape(tk_tokens, st.head_dim)
                 for r in (k_ref, tk_ref))
        v, tv = (_load(r, st, "kv", ko, (*tile, slice(None))).reshape(tk_tokens, st.value_dim)
                 for r in (v_ref, tv_ref))
        s = _dot(q, k, trans_b=True, f32=f32) * qk_scale
        y = [ko[a] + k_local[a] for a in range(plan.rank)]
        s = _add_bias(s, rpb_ref, st, q_part, y)
        p = _masked_probs(geo, full, spans, y, s, lse2)  # zero outside the windows
        ts = (_dot(tq, k, trans_b=True, f32=f32) + _dot(q, tk, trans_b=True, f32=f32)) * st.scale
        if rpb_ref is not None:  # masked pairs read a clamped entry; p is 0 there
            ts = ts + _bias(trpb_ref, st, q_part, _bias_part(st, y))
        pts = p * ts
        acc = acc + _dot(pts.astype(v.dtype), v, f32=f32) + _dot(p.astype(tv.dtype), tv, f32=f32)
        return acc, mu + jnp.sum(pts, axis=1)

    init = (jnp.zeros((tq_tokens, st.value_dim), jnp.float32), jnp.zeros((tq_tokens,), jnp.float32))
    acc, mu = jax.lax.fori_loop(0, walk.total, body, init)
    out = _own(o_ref, st, "q", qt).reshape(tq_tokens, st.value_dim).astype(jnp.float32)
    _put(to_ref, st, "q", qt, (acc - mu[:, None] * out).astype(to_ref.dtype))
    _put(tlse_ref, st, "q", qt, mu)


def tangent_call(qp, kp, vp, out, lse, tq, tk, tv, st: _Static, rpb=None, trpb=None):
    """``(tout, tlse)`` on kernel-layout tensors (`fused._fused`'s): q/tq ``[BG, *tokens, H, D']``,
    k/v/tk/tv ``[BG, *tokens, H_kv, D']``, out ``[BG, *tokens, H, Dv']``, lse ``[BG, *tokens, H]``
    float32 -> tout like out, tlse like lse. With a bias (``st.bias``): ``rpb`` and its tangent
    ``trpb``, kernel-layout tables ``[H, bias_padded]`` (`fused._bias_table`)."""
    tables = _tables(st)
    spec = _Specs(st)
    tq, tk, tv = tq.astype(qp.dtype), tk.astype(kp.dtype), tv.astype(vp.dtype)
    bias_specs, bias = _bias_operands(st, rpb, spec)
    if bias:
        bias_specs, bias = bias_specs * 2, [rpb, trpb.astype(jnp.float32)]
    return pl.pallas_call(
        functools.partial(_tangent_kernel, st=st),
        grid=(st.plan.num_q_tiles, _grid_batch(qp, st), st.heads),
        in_specs=[
            spec.tile("q", st.head_dim),
            spec.whole("kv", None, st.head_dim),
            spec.whole("kv", None, st.value_dim),
            spec.tile("q", st.value_dim),
            spec.tile("q"),
            spec.tile("q", st.head_dim),
            spec.whole("kv", None, st.head_dim),
            spec.whole("kv", None, st.value_dim),
            spec.table(tables),
            *bias_specs,
        ],
        out_specs=[spec.tile("q", st.value_dim), spec.tile("q")],
        out_shape=[jax.ShapeDtypeStruct(out.shape, out.dtype), jax.ShapeDtypeStruct(lse.shape, jnp.float32)],
        compiler_params=_params(st, backward=True),
        interpret=st.interpret,
        name="jna_fused_na_tangent",
    )(qp, kp, vp, out, lse, tq, tk, tv, tables, *bias)
