"""The fused Mosaic GPU backward kernels: dQ over each Q tile's KV visit list, dK/dV over each
KV tile's transposed list (docs/fused_triton.md, "Backward"). Deterministic: no atomics; GQA sums dK/dV over
the query heads of a group inside the kernel.

Both kernels are warp specialized like the forward: consumer warpgroups own 64 rows of the
CTA's tile (Q rows for dQ, K/V rows for dK/dV), a producer warpgroup streams the visited tiles
with TMA into a 2-stage SMEM ring. The visited tiles are processed in 64-token sub-tiles, so a
consumer holds at most two ``[64, 64]`` float32 score blocks beside its ``[64, D]`` accumulators
(dK and dV together are 128 registers per thread at D=128).

With ``c = scale * log2(e)`` and the forward's logsumexp ``lse`` (natural log):
``P = exp2(S c - lse log2 e)``, ``dP = dO V^T``, ``dS = P (dP - delta)`` with
``delta = rowsum(dO * O) - dlse``; ``dQ = scale dS K``, ``dK = scale dS^T Q``, ``dV = P^T dO``.

Relative positional bias (``st.rpb``): ``P`` is recomputed with the bias, ``P = exp2(S c + B log2 e
- lse log2 e)``. The dQ kernel reads the class blocks ``[H, C, Tq, Tk]`` and the dK/dV kernels
their transposes ``[H, C, Tk, Tq]`` (both from `jna._src.rpb_tiles.tile_bias`, base-2 units), a
``[64, 64]`` sub-block per sub-tile, loaded from GMEM into registers before the sub-tile's wgmmas
(`mosaic_common.load_bias`). ``d_rpb`` (a sum of ``dS`` per tile-offset class, which neither
kernel's grid can reduce) is `jna.backends.mosaic.rpb_grad`'s.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jna.backends import tiling
from jna.backends.mosaic.common import (
    ROWS, WGMMA, WGMMA_COL, WGMMA_ROW, Static, iota, key_coords, kv_tile_visits, load_bias,
    mask_logits, launch, q_tile_visits, query_windows, smem,
)

_LOG2E = tiling.LOG2E
_STAGES = 2
_SUB = 64  # tokens per sub-tile of a visited tile


def _accumulate(st: Static, acc, a, b_ref, staging):
    """``acc + a @ b_ref`` with ``a`` in registers (GPU) or staged through SMEM (simulator)."""
    if not st.simulated:
        def mma(acc_ref):
            plgpu.wgmma(acc_ref, a, b_ref)

        return pl.run_state(mma)(plgpu.ACC.init(acc))
    staging[...] = a
    plgpu.commit_smem()

    def mma(acc_ref):
        plgpu.wgmma(acc_ref, staging, b_ref)
        return acc_ref[...]

    return acc + pl.run_scoped(mma, plgpu.ACC(acc.shape, jnp.float32))


def _two_products(a1, b1, a2, b2, n: int):
    """``(a1 @ b1, a2 @ b2)``, ``[64, n]`` float32 each, both wgmmas in flight before one wait.
    An operand may be a list of column blocks (`Static.column_parts`): ``sum_c a[c] @ b[c]``."""
    def mma(r1, r2):
        for acc, a, b in ((r1, a1, b1), (r2, a2, b2)):
            for ac, bc in (zip(a, b) if isinstance(a, list) else [(a, b)]):
                plgpu.wgmma(acc, ac, bc)
        return r1[...], r2[...]

    return pl.run_scoped(mma, plgpu.ACC((ROWS, n), jnp.float32), plgpu.ACC((ROWS, n), jnp.float32))


def _producer(total, issue_step, free):
    """Fills the ring: step ``i`` goes to slot ``i % 2`` once its previous reader released it."""
    for i in range(_STAGES):
        pl.when(i < total)(functools.partial(issue_step, i, i))

    @pl.loop(0, total - _STAGES)
    def _(i):
        slot = lax.rem(i, np.int32(_STAGES))
        plgpu.barrier_wait(free.at[slot])
        issue_step(i + _STAGES, slot)

    for s in range(_STAGES):  # drain (see mosaic_forward)
        pl.when(s < total)(lambda s=s: plgpu.barrier_wait(free.at[s]))


# ----------------------------------------------------------------------------------------------
# Pieces of a KV-tile-major kernel (the dK/dV kernel here and the one-kernel backward,
# `jna.backends.mosaic.backward_fused`)
# ----------------------------------------------------------------------------------------------


def kv_program(st: Static, tab_ref, parts: int = 1):
    """This program's place in a KV-tile-major grid ``("kv", "bg", "h")`` with warpgroups ``"wg"``:
    ``(kt_flat, bg, kv_head, wg, geo, kt, total, q_tile)`` with ``kt`` the per-axis KV tile ids
    and ``(total, q_tile)`` its (query head, Q tile) visits (`q_tile_visits`). ``parts`` > 1:
    the ``"h"`` axis runs ``kv_heads * parts`` programs (the column block is ``h % parts``)."""
    plan = st.plan
    kt_flat = lax.axis_index("kv")
    bg = lax.axis_index("bg")
    kv_head = lax.axis_index("h") if parts == 1 else lax.div(lax.axis_index("h"), np.int32(parts))
    wg = lax.axis_index("wg")
    geo = tiling.Geometry(plan, tab_ref, bg)
    kt = tiling.unravel(kt_flat, [a.num_kv_tiles for a in plan.axes])
    total, q_tile = q_tile_visits(geo, kt, st.group)
    return kt_flat, bg, kv_head, wg, geo, kt, total, q_tile


def copy_columns(src, dst, barrier, parts: int):
    """TMA of ``src`` (GMEM ``[n, D]``) into ``dst``: ``[n, D]``, or ``[parts, n, D / parts]``
    column blocks (one copy each: ``barrier`` counts ``parts`` arrivals)."""
    if parts == 1:
        plgpu.copy_gmem_to_smem(src, dst, barrier)
        return
    width = src.shape[-1] // parts
    for c in range(parts):
        plgpu.copy_gmem_to_smem(src.at[:, pl.ds(c * width, width)], dst.at[c], barrier)


def load_kv_rows(k_ref, v_ref, k_slot, v_slot, row_bars, bg, rows, kv_head, wg, kt, st: Static,
                 parts: int = 1):
    """Copies a consumer's 64 K and V rows into SMEM (``parts``: `copy_columns`); returns the
    rows' per-axis key coordinates (along the rows of the transposed scores) once both copies
    have landed."""
    for src, dst, bar in zip((k_ref, v_ref), (k_slot, v_slot), row_bars):
        copy_columns(src.at[bg, rows, kv_head], dst, bar.at[wg], parts)
    keys = key_coords(kt, st.config.kv_tile, iota(ROWS, WGMMA_ROW, wg * ROWS))
    for bar in row_bars:
        plgpu.barrier_wait(bar.at[wg])
    return keys


def transposed_probs(st: Static, geo, qt, keys, full, k_slot, v_slot, q_sub, do_sub, lse_sub,
                     delta_sub, sub_index, bias_t=None):
    """``(P^T, dS^T)``, ``[64 keys, 64 queries]`` float32, of a consumer's keys and the 64 queries
    of sub-tile ``sub_index`` (static or traced) of Q tile ``qt`` (``lse_sub``/``delta_sub``:
    their SMEM rows). The edge mask is applied unless the tile pair is ``full``. ``bias_t``: the
    pair's transposed bias sub-block ``[64 keys, 64 queries]`` in base-2 units (loaded by the
    caller before this issues its wgmmas), or None."""
    lse2 = plgpu.load(lse_sub, layout=WGMMA_COL) * _LOG2E
    delta = plgpu.load(delta_sub, layout=WGMMA_COL)
    # Transposed scores: keys along the rows, queries along the columns.
    if st.column_parts == 1:
        s_t, dp_t = _two_products(k_slot, q_sub.T, v_slot, do_sub.T, _SUB)
    else:  # column blocks: S^T = sum_c K_c Q_c^T
        blocks = range(st.column_parts)
        s_t, dp_t = _two_products([k_slot.at[c] for c in blocks], [q_sub.at[c].T for c in blocks],
                                  [v_slot.at[c] for c in blocks], [do_sub.at[c].T for c in blocks], _SUB)

    def mask(s):
        windows = query_windows(geo, qt, st.config.q_tile, iota(_SUB, WGMMA_COL, sub_index * _SUB))
        return mask_logits(s, windows, keys, 1)

    if bias_t is None:
        s_t = lax.cond(full, lambda s: s, mask, s_t)
        p_t = jnp.exp2(s_t * (st.scale * _LOG2E) - lax.broadcast_in_dim(lse2, s_t.shape, [1]))
    else:  # the bias before the mask, as in the forward
        t = lax.cond(full, lambda t: t, mask, s_t * (st.scale * _LOG2E) + bias_t)
        p_t = jnp.exp2(t - lax.broadcast_in_dim(lse2, t.shape, [1]))
    ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, s_t.shape, [1]))
    return p_t, ds_t


def store_dkv(st: Static, dk, dv, k_slot, v_slot, dk_ref, dv_ref, bg, rows, kv_head):
    """Writes a consumer's dK (scaled) and dV rows through its K/V SMEM slots."""
    k_slot[...] = (dk * st.scale).astype(st.dtype)
    v_slot[...] = dv.astype(st.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_slot, dk_ref.at[bg, rows, kv_head])
    plgpu.copy_smem_to_gmem(v_slot, dv_ref.at[bg, rows, kv_head])
    plgpu.wait_smem_to_gmem(0)


def issue_query_side(refs, rings, ring_bars, slot, bg, head, tokens, parts: int = 1):
    """TMA copies of q, dO (``[tokens, D]``; ``parts``: `copy_columns`), lse and delta
    (``[tokens]``) of one query head into ring slot ``slot``. ``refs``/``rings``: the four GMEM
    operands and their rings."""
    q_ref, do_ref, lse_ref, delta_ref = refs
    sources = (q_ref.at[bg, tokens, head], do_ref.at[bg, tokens, head],
               lse_ref.at[bg, head, tokens], delta_ref.at[bg, head, tokens])
    for i, (src, ring, ready) in enumerate(zip(sources, rings, ring_bars)):
        copy_columns(src, ring.at[slot], ready.at[slot], parts if i < 2 else 1)


# ----------------------------------------------------------------------------------------------
# dQ
# ----------------------------------------------------------------------------------------------


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, tab_ref, bias_ref, dq_ref, scoped, *,
               st: Static):
    (q_smem, do_smem, lse_smem, delta_smem, k_ring, v_ring, staging), row_bars, ring_bars, free = scoped
    plan, cfg = st.plan, st.config
    nwg, tq, tk, dim = st.q_warpgroups, cfg.q_tokens, cfg.kv_tokens, st.head_dim

    qt_flat = lax.axis_index("q")
    bg = lax.axis_index("bg")
    head = lax.axis_index("h")
    wg = lax.axis_index("wg")
    geo = tiling.Geometry(plan, tab_ref, bg)
    qt = tiling.unravel(qt_flat, [a.num_q_tiles for a in plan.axes])
    total, kv_tile = kv_tile_visits(geo, qt)

    @pl.when(wg < nwg)
    def _consumer():
        if nwg > 1:
            plgpu.set_max_registers(232, action="increase")
        rows = pl.ds(qt_flat * tq + wg * ROWS, ROWS)
        q_slot, do_slot = q_smem.at[wg], do_smem.at[wg]
        sources = (q_ref.at[bg, rows, head], do_ref.at[bg, rows, head], lse_ref.at[bg, head, rows],
                   delta_ref.at[bg, head, rows])
        for src, dst, bar in zip(sources, (q_slot, do_slot, lse_smem.at[wg], delta_smem.at[wg]), row_bars):
            plgpu.copy_gmem_to_smem(src, dst, bar.at[wg])
        windows = query_windows(geo, qt, cfg.q_tile, iota(ROWS, WGMMA_ROW, wg * ROWS))
        for bar in row_bars:
            plgpu.barrier_wait(bar.at[wg])
        lse2 = plgpu.load(lse_smem.at[wg], layout=WGMMA_ROW) * _LOG2E
        delta = plgpu.load(delta_smem.at[wg], layout=WGMMA_ROW)
        qk_scale = st.scale * _LOG2E
        k_ready, v_ready = ring_bars

        def body(step, dq):
            slot = lax.rem(step, np.int32(_STAGES))
            kt, _ = kv_tile(step)
            full = geo.full(qt, kt) > 0
            cls = None if bias_ref is None else st.rpb.pair_class(qt, kt)
            plgpu.barrier_wait(k_ready.at[slot])
            plgpu.barrier_wait(v_ready.at[slot])
            for j in range(tk // _SUB):
                k_sub = k_ring.at[slot, pl.ds(j * _SUB, _SUB)]
                v_sub = v_ring.at[slot, pl.ds(j * _SUB, _SUB)]
                bias = None if cls is None else load_bias(  # before the wgmmas: overlaps them
                    bias_ref, head, cls, pl.ds(wg * ROWS, ROWS), pl.ds(j * _SUB, _SUB))
                s, dp = _two_products(q_slot, k_sub.T, do_slot, v_sub.T, _SUB)

                def mask(s, j=j):
                    keys = key_coords(kt, cfg.kv_tile, iota(_SUB, WGMMA_COL, j * _SUB))
                    return mask_logits(s, windows, keys, 0)

                if bias is None:
                    s = lax.cond(full, lambda s: s, mask, s)
                    p = jnp.exp2(s * qk_scale - lax.broadcast_in_dim(lse2, s.shape, [0]))
                else:  # the bias before the mask, as in the forward
                    t = lax.cond(full, lambda t: t, mask, s * qk_scale + bias)
                    p = jnp.exp2(t - lax.broadcast_in_dim(lse2, t.shape, [0]))
                ds = p * (dp - lax.broadcast_in_dim(delta, s.shape, [0]))
                dq = _accumulate(st, dq, ds.astype(st.dtype), k_sub,
                                 staging.at[wg] if st.simulated else None)
            plgpu.barrier_arrive(free.at[slot])
            return dq

        dq = plgpu.layout_cast(jnp.zeros((ROWS, dim), jnp.float32), WGMMA)
        dq = lax.fori_loop(0, total, body, dq)
        q_slot[...] = (dq * st.scale).astype(st.dtype)  # Q's slot is free after the last S
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_slot, dq_ref.at[bg, rows, head])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == nwg)
    def _():
        if nwg > 1:
            plgpu.set_max_registers(40, action="decrease")
        kv_head = lax.div(head, np.int32(st.group))

        def issue(step, slot):
            _, kt_flat = kv_tile(step)
            tokens = pl.ds(kt_flat * tk, tk)
            for ref, ring, ready in zip((k_ref, v_ref), (k_ring, v_ring), ring_bars):
                plgpu.copy_gmem_to_smem(ref.at[bg, tokens, kv_head], ring.at[slot], ready.at[slot])

        _producer(total, issue, free)


def dq_call(qp, kp, vp, dop, lse, delta, st: Static, bias=None):
    """dQ ``[BG, Nq, H, D]`` (in q's dtype) from permuted q/k/v/dO, ``lse``/``delta`` ``[BG, H, Nq]``;
    ``bias`` (with ``st.rpb``): the class blocks ``[H, C, Tq, Tk]`` (base 2, `forward_call`'s)."""
    plan, cfg = st.plan, st.config
    nwg, dim = st.q_warpgroups, st.head_dim
    _check_bias(bias, st)

    def entry(*refs):
        if bias is None:  # the kernel's bias_ref
            refs = (*refs[:7], None, *refs[7:])
        scratch = (
            smem((nwg, ROWS, dim), st.dtype),
            smem((nwg, ROWS, dim), st.dtype),
            plgpu.SMEM((nwg, ROWS), jnp.float32),
            plgpu.SMEM((nwg, ROWS), jnp.float32),
            smem((_STAGES, cfg.kv_tokens, dim), st.dtype),
            smem((_STAGES, cfg.kv_tokens, dim), st.dtype),
            smem((nwg, ROWS, _SUB), st.dtype) if st.simulated else None,
        )
        row_bars = (plgpu.Barrier(num_barriers=nwg),) * 4
        ring_bars = (plgpu.Barrier(num_barriers=_STAGES),) * 2
        free = plgpu.Barrier(num_arrivals=nwg, num_barriers=_STAGES)
        pl.run_scoped(lambda *scoped: _dq_kernel(*refs, scoped, st=st),
                      scratch, row_bars, ring_bars, free, collective_axes="wg")

    grid = dict(grid=(plan.num_q_tiles, qp.shape[0], st.heads), grid_names=("q", "bg", "h"))
    return launch(entry, st, jax.ShapeDtypeStruct(qp.shape, st.dtype), grid, nwg + 1)(
        qp, kp, vp, dop, lse, delta, jnp.asarray(plan.tables), *(() if bias is None else (bias,)))


def _check_bias(bias, st: Static):
    if (bias is None) != (st.rpb is None):
        raise ValueError("bias blocks go with Static.rpb (both or neither)")


# ----------------------------------------------------------------------------------------------
# dK, dV
# ----------------------------------------------------------------------------------------------


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, tab_ref, bias_ref, dk_ref, dv_ref,
                scoped, *, st: Static):
    (k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring, staging), row_bars, ring_bars, free = scoped
    cfg = st.config
    nwg, tq, tk, parts = st.kv_warpgroups, cfg.q_tokens, cfg.kv_tokens, st.column_parts
    width = st.head_dim // parts  # the columns of dK/dV this CTA computes

    kt_flat, bg, kv_head, wg, geo, kt, total, q_tile = kv_program(st, tab_ref, parts)
    part = lax.rem(lax.axis_index("h"), np.int32(parts)) if parts > 1 else None

    @pl.when(wg < nwg)
    def _consumer():
        if nwg > 1:
            plgpu.set_max_registers(232, action="increase")
        rows = pl.ds(kt_flat * tk + wg * ROWS, ROWS)
        k_slot, v_slot = k_smem.at[wg], v_smem.at[wg]
        keys = load_kv_rows(k_ref, v_ref, k_slot, v_slot, row_bars, bg, rows, kv_head, wg, kt, st, parts)

        def body(step, carry):
            dk, dv = carry
            slot = lax.rem(step, np.int32(_STAGES))
            jh, qt, _ = q_tile(step)
            full = geo.full(qt, kt) > 0
            cls = None if bias_ref is None else st.rpb.pair_class(qt, kt)
            for bar in ring_bars:
                plgpu.barrier_wait(bar.at[slot])
            for j in range(tq // _SUB):
                cols = pl.ds(j * _SUB, _SUB)
                rows_j = (slot, cols) if parts == 1 else (slot, slice(None), cols)
                q_sub, do_sub = q_ring.at[rows_j], do_ring.at[rows_j]
                bias_t = None if cls is None else load_bias(
                    bias_ref, kv_head * st.group + jh, cls, pl.ds(wg * ROWS, ROWS), cols)
                pt, dst = transposed_probs(st, geo, qt, keys, full, k_slot, v_slot, q_sub, do_sub,
                                           lse_ring.at[slot, cols], delta_ring.at[slot, cols], j, bias_t)
                # With column blocks this CTA's block of dO and Q (a dynamic leading index).
                do_mine, q_mine = (do_sub, q_sub) if parts == 1 else (do_sub.at[part], q_sub.at[part])
                dv = _accumulate(st, dv, pt.astype(st.dtype), do_mine,
                                 staging.at[wg, 0] if st.simulated else None)
                dk = _accumulate(st, dk, dst.astype(st.dtype), q_mine,
                                 staging.at[wg, 1] if st.simulated else None)
            plgpu.barrier_arrive(free.at[slot])
            return dk, dv

        zeros = plgpu.layout_cast(jnp.zeros((ROWS, width), jnp.float32), WGMMA)
        dk, dv = lax.fori_loop(0, total, body, (zeros, zeros))
        if parts == 1:
            store_dkv(st, dk, dv, k_slot, v_slot, dk_ref, dv_ref, bg, rows, kv_head)
        else:  # this CTA's columns, staged in the first column block of its K/V rows
            store_dkv(st, dk, dv, k_slot.at[0], v_slot.at[0], dk_ref.at[:, :, :, pl.ds(part * width, width)],
                      dv_ref.at[:, :, :, pl.ds(part * width, width)], bg, rows, kv_head)

    @pl.when(wg == nwg)
    def _():
        if nwg > 1:
            plgpu.set_max_registers(40, action="decrease")

        def issue(step, slot):
            j, _, qt_flat = q_tile(step)
            issue_query_side((q_ref, do_ref, lse_ref, delta_ref), (q_ring, do_ring, lse_ring, delta_ring),
                             ring_bars, slot, bg, kv_head * st.group + j, pl.ds(qt_flat * tq, tq), parts)

        _producer(total, issue, free)


def dkv_call(qp, kp, vp, dop, lse, delta, st: Static, bias_t=None):
    """dK, dV ``[BG, Nk, H_kv, D]`` (in k's dtype) from the same operands as `dq_call`;
    ``bias_t`` (with ``st.rpb``): the transposed class blocks ``[H, C, Tk, Tq]`` (base 2)."""
    plan, cfg = st.plan, st.config
    nwg, parts = st.kv_warpgroups, st.column_parts
    _check_bias(bias_t, st)
    # [rows, D], or [parts, rows, D / parts] column blocks (`Static.column_parts`).
    rows_of_dim = (lambda *lead: (*lead, st.head_dim)) if parts == 1 else (
        lambda *lead: (*lead[:-1], parts, lead[-1], st.head_dim // parts))

    def entry(*refs):
        scratch = (
            smem(rows_of_dim(nwg, ROWS), st.dtype),
            smem(rows_of_dim(nwg, ROWS), st.dtype),
            smem(rows_of_dim(_STAGES, cfg.q_tokens), st.dtype),
            smem(rows_of_dim(_STAGES, cfg.q_tokens), st.dtype),
            plgpu.SMEM((_STAGES, cfg.q_tokens), jnp.float32),
            plgpu.SMEM((_STAGES, cfg.q_tokens), jnp.float32),
            smem((nwg, 2, ROWS, _SUB), st.dtype) if st.simulated else None,
        )
        # One arrival per TMA copy: q/dO and the K/V rows take one copy per column block.
        row_bars = (plgpu.Barrier(num_arrivals=parts, num_barriers=nwg),) * 2
        ring_bars = ((plgpu.Barrier(num_arrivals=parts, num_barriers=_STAGES),) * 2
                     + (plgpu.Barrier(num_barriers=_STAGES),) * 2)
        free = plgpu.Barrier(num_arrivals=nwg, num_barriers=_STAGES)
        if bias_t is None:  # the kernel's bias_ref
            refs = (*refs[:7], None, *refs[7:])
        pl.run_scoped(lambda *scoped: _dkv_kernel(*refs, scoped, st=st),
                      scratch, row_bars, ring_bars, free, collective_axes="wg")

    shape = jax.ShapeDtypeStruct(kp.shape, st.dtype)
    grid = dict(grid=(plan.num_kv_tiles, kp.shape[0], st.kv_heads * parts), grid_names=("kv", "bg", "h"))
    return launch(entry, st, [shape, shape], grid, nwg + 1)(
        qp, kp, vp, dop, lse, delta, jnp.asarray(plan.tables), *(() if bias_t is None else (bias_t,)))
