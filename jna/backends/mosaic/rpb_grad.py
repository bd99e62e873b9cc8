"""The relative positional bias's gradient in Mosaic GPU: the sum of ``dS`` over the tile pairs of
each tile-offset class (`jna._src.rpb_tiles`), deterministic.

``d_rpb[h, u]`` is the sum of ``dS = P (dP - delta)`` over the batch and the (query, key) pairs
at offset ``u``. In a tile pair every (tile-local query ``i``, key ``j``) has a fixed offset per
class, so ``d_rpb`` is a fixed linear map (`rpb_tiles.tile_bias_grad`, in XLA) of the per-class
sums ``dB[h, c] = sum over the pairs of class c of dS_pair``, ``[Tq, Tk]`` each. Neither backward
kernel can form those sums: the dQ kernel's CTA owns one Q tile and meets each class once (so
does the dK/dV kernel's KV tile); summing across CTAs would take atomics (run-to-run
nondeterministic float adds) or one ``[Tq, Tk]`` block per visited pair (the size of ``dS``).

So this kernel is class-major: one CTA per (class ``c``, query head ``h``, chunk of the batch,
64-row block ``w`` of the Q tile) loops over every pair of its class (the plan's per-axis lists,
`RpbAxis.items_q`/``items_kv``, in its batch entries' dilation groups), recomputes ``S`` and
``dP`` (two wgmmas per 64-key sub-tile), ``P`` with the bias and ``dS``, and accumulates ``dS``
in registers, in a fixed order. It writes its ``[64, Tk]`` rows of one partial block; `drpb_call`
sums the partials of the batch chunks in XLA (a reduction: fixed order). No atomics, no
semaphores. Cost: the two score wgmmas again per pair (the split backward does 5 per pair beside
the forward's 2), and per pair its loads of Q/dO rows and K/V tiles.

Warp specialized like the other kernels: one consumer warpgroup (its 64 rows) and a producer
warpgroup that streams Q, dO (64 rows), lse, delta and the K, V tiles of each pair with TMA into
a 2-stage ring (1 stage where two do not fit SMEM, e.g. head dim 256).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jna.backends import tiling
from jna.backends.mosaic.backward import _two_products
from jna.backends.mosaic.common import (
    ROWS, WGMMA, WGMMA_COL, WGMMA_ROW, Static, iota, key_coords, launch, load_bias, mask_logits,
    query_windows, smem,
)

_LOG2E = tiling.LOG2E
_SUB = 64  # keys per sub-tile (the N of the score wgmmas)
_SMEM_BYTES = 227 * 1024  # Hopper's dynamic SMEM per CTA
_TARGET_CTAS = 2 * 132  # enough CTAs for two waves of an H100/H200's 132 SMs


def stages(st: Static) -> int:
    """Depth of the ring: 2 where two stages of Q/dO rows, K/V tiles and lse/delta fit SMEM beside
    the ``[64, 64]`` float32 output staging, else 1."""
    item = jnp.dtype(st.dtype).itemsize
    stage = 2 * (ROWS + st.config.kv_tokens) * st.head_dim * item + 2 * ROWS * 4
    return 2 if 2 * stage + ROWS * _SUB * 4 + 1024 <= _SMEM_BYTES else 1


def chunks(st: Static, batch_groups: int) -> int:
    """Batch chunks (partial blocks) of the launch: enough CTAs to fill the GPU, at most one per
    batch*group entry. The simulator takes 2 where it can (so the partial sum is exercised)."""
    if st.simulated:
        return min(2, batch_groups)
    per_chunk = st.rpb.num_classes * st.heads * (st.config.q_tokens // ROWS)
    return max(1, min(batch_groups, math.ceil(_TARGET_CTAS / per_chunk)))


def _pairs(st: Static, tab_ref, items_ref, bg, cls_axes):
    """The pairs of class ``cls_axes`` (per-axis class ids) in batch*group entry ``bg``'s dilation
    group: ``(geo, total, at)``, ``at(i) -> (qt, kt)`` per-axis tile ids of pair ``i``."""
    plan, rplan = st.plan, st.rpb
    geo = tiling.Geometry(plan, tab_ref, bg)
    base = [(g * ax.count + c) for g, c, ax in zip(geo.g, cls_axes, rplan.axes)]
    counts = [items_ref[off[2] + b] for off, b in zip(rplan.offsets, base)]
    total = _product(counts)

    def at(i):
        idx = tiling.unravel(i, counts) if len(counts) > 1 else [i]
        qt, kt = [], []
        for off, b, n, ax in zip(rplan.offsets, base, idx, plan.axes):
            row = b * ax.num_q_tiles + n
            qt.append(items_ref[off[0] + row])
            kt.append(items_ref[off[1] + row])
        return qt, kt

    return geo, total, at


def _product(values):
    out = values[0]
    for v in values[1:]:
        out = out * v
    return out


def _kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, tab_ref, items_ref, bias_ref, part_ref,
            scoped, *, st: Static, n_chunks: int, batch_groups: int):
    (q_ring, do_ring, k_ring, v_ring, lse_ring, delta_ring, staging), ready, free = scoped
    plan, rplan, cfg = st.plan, st.rpb, st.config
    n_stages, tk, rows_per_tile = stages(st), cfg.kv_tokens, cfg.q_tokens // ROWS
    subs = tk // _SUB
    cls, head, part = lax.axis_index("c"), lax.axis_index("h"), lax.axis_index("p")
    w, chunk = ((lax.rem(part, np.int32(rows_per_tile)), lax.div(part, np.int32(rows_per_tile)))
                if rows_per_tile > 1 else (0, part))
    per_chunk = -(-batch_groups // n_chunks)
    bg_lo = chunk * per_chunk
    bg_hi = jnp.minimum(bg_lo + per_chunk, batch_groups)
    cls_axes = tiling.unravel(cls, rplan.counts) if plan.rank > 1 else [cls]
    kv_head = lax.div(head, np.int32(st.group))
    wg = lax.axis_index("wg")
    ring = lambda step: lax.rem(step, np.int32(n_stages))

    @pl.when(wg == 0)
    def _consumer():
        # The class's bias block (base 2): the same for every pair of the loop, so loaded once.
        bias = [load_bias(bias_ref, head, cls, pl.ds(w * ROWS, ROWS), pl.ds(j * _SUB, _SUB))
                for j in range(subs)]
        qk_scale = st.scale * _LOG2E

        def per_entry(bg, carry):
            step0, acc = carry
            geo, total, at = _pairs(st, tab_ref, items_ref, bg, cls_axes)

            def body(i, acc):
                slot = ring(step0 + i)
                qt, kt = at(i)
                full = geo.full(qt, kt) > 0
                windows = query_windows(geo, qt, cfg.q_tile, iota(ROWS, WGMMA_ROW, w * ROWS))
                for bar in ready:
                    plgpu.barrier_wait(bar.at[slot])
                lse2 = plgpu.load(lse_ring.at[slot], layout=WGMMA_ROW) * _LOG2E
                delta = plgpu.load(delta_ring.at[slot], layout=WGMMA_ROW)
                acc = list(acc)
                for j in range(subs):
                    k_sub = k_ring.at[slot, pl.ds(j * _SUB, _SUB)]
                    v_sub = v_ring.at[slot, pl.ds(j * _SUB, _SUB)]
                    s, dp = _two_products(q_ring.at[slot], k_sub.T, do_ring.at[slot], v_sub.T, _SUB)

                    def mask(t, j=j):
                        keys = key_coords(kt, cfg.kv_tile, iota(_SUB, WGMMA_COL, j * _SUB))
                        return mask_logits(t, windows, keys, 0)

                    t = lax.cond(full, lambda t: t, mask, s * qk_scale + bias[j])
                    p = jnp.exp2(t - lax.broadcast_in_dim(lse2, t.shape, [0]))
                    acc[j] = acc[j] + p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))
                # lse and delta were read by generic loads, the next TMA into this slot writes
                # through the async proxy: fence the two before the slot is released (the
                # simulator's race detector insists; on the GPU it is one fence per pair).
                plgpu.commit_smem()
                plgpu.barrier_arrive(free.at[slot])
                return tuple(acc)

            return step0 + total, lax.fori_loop(0, total, body, acc)

        zeros = plgpu.layout_cast(jnp.zeros((ROWS, _SUB), jnp.float32), WGMMA)
        _, acc = lax.fori_loop(bg_lo, bg_hi, per_entry, (jnp.int32(0), (zeros,) * subs))
        for j in range(subs):  # this CTA's rows of its chunk's partial block, 64 columns at a time
            staging[...] = acc[j]
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(
                staging, part_ref.at[chunk, head, cls, pl.ds(w * ROWS, ROWS), pl.ds(j * _SUB, _SUB)])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 1)
    def _producer():
        radices_q = [a.num_q_tiles for a in plan.axes]
        radices_k = [a.num_kv_tiles for a in plan.axes]

        def per_entry(bg, step0):
            _, total, at = _pairs(st, tab_ref, items_ref, bg, cls_axes)

            @pl.loop(0, total)
            def _(i):
                step = step0 + i
                slot = ring(step)
                pl.when(step >= n_stages)(lambda: plgpu.barrier_wait(free.at[slot]))
                qt, kt = at(i)
                rows = pl.ds(tiling.ravel(qt, radices_q) * cfg.q_tokens + w * ROWS, ROWS)
                keys = pl.ds(tiling.ravel(kt, radices_k) * tk, tk)
                copies = ((q_ref.at[bg, rows, head], q_ring), (do_ref.at[bg, rows, head], do_ring),
                          (lse_ref.at[bg, head, rows], lse_ring), (delta_ref.at[bg, head, rows], delta_ring),
                          (k_ref.at[bg, keys, kv_head], k_ring), (v_ref.at[bg, keys, kv_head], v_ring))
                for (src, dst), bar in zip(copies, ready):
                    plgpu.copy_gmem_to_smem(src, dst.at[slot], bar.at[slot])

            return step0 + total

        steps = lax.fori_loop(bg_lo, bg_hi, per_entry, jnp.int32(0))
        for s in range(n_stages):  # drain (see mosaic_forward)
            pl.when(s < steps)(lambda s=s: plgpu.barrier_wait(free.at[s]))


def drpb_call(qp, kp, vp, dop, lse, delta, bias, st: Static):
    """The per-class sums of ``dS``: ``[H, C, Tq, Tk]`` float32 (natural units: the bias is added
    after scaling, so ``d_rpb`` has no scale factor), summed over the batch chunks' partials.

    Args:
      qp, dop: ``[BG, Nq, H, D]``; kp, vp: ``[BG, Nk, H_kv, D]`` (permuted by ``st.plan``).
      lse, delta: ``[BG, H, Nq]`` float32 (as for `mosaic_backward.dq_call`).
      bias: the class blocks ``[H, C, Tq, Tk]`` in base-2 units (`rpb_tiles.tile_bias`).
    """
    rplan, cfg = st.rpb, st.config
    n_stages, dim, batch_groups = stages(st), st.head_dim, qp.shape[0]
    n_chunks = chunks(st, batch_groups)
    rows_per_tile = cfg.q_tokens // ROWS

    def entry(*refs):
        scratch = (
            smem((n_stages, ROWS, dim), st.dtype),  # Q rows
            smem((n_stages, ROWS, dim), st.dtype),  # dO rows
            smem((n_stages, cfg.kv_tokens, dim), st.dtype),  # K tile
            smem((n_stages, cfg.kv_tokens, dim), st.dtype),  # V tile
            plgpu.SMEM((n_stages, ROWS), jnp.float32),  # lse
            plgpu.SMEM((n_stages, ROWS), jnp.float32),  # delta
            plgpu.SMEM((ROWS, _SUB), jnp.float32),  # output staging
        )
        ready = (plgpu.Barrier(num_barriers=n_stages),) * 6  # one per operand's TMA copy
        free = plgpu.Barrier(num_arrivals=1, num_barriers=n_stages)
        pl.run_scoped(lambda *scoped: _kernel(*refs, scoped, st=st, n_chunks=n_chunks,
                                              batch_groups=batch_groups),
                      scratch, ready, free, collective_axes="wg")

    out = jax.ShapeDtypeStruct((n_chunks, st.heads, rplan.num_classes, cfg.q_tokens, cfg.kv_tokens),
                               jnp.float32)
    grid = dict(grid=(rplan.num_classes, st.heads, n_chunks * rows_per_tile), grid_names=("c", "h", "p"))
    parts = launch(entry, st, out, grid, 2)(qp, kp, vp, dop, lse, delta, jnp.asarray(st.plan.tables),
                                            jnp.asarray(rplan.tables), bias)
    return jnp.sum(parts, axis=0)
