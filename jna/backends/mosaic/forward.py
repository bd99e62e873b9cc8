"""The fused Mosaic GPU forward kernel: ``(out, lse)`` of one NA call on permuted tensors.

One CTA per (Q tile, batch*group, head), warp specialized like FA3
(`jax.experimental.pallas.ops.gpu.attention_mgpu`): ``Q tile tokens / 64`` consumer warpgroups
(1 or 2) each own 64 query rows; one producer warpgroup walks the same KV visit list and streams
K/V tiles with TMA into a ``num_stages`` SMEM ring guarded by barriers. Consumers: ``S = Q K^T``
and ``O += P V`` with wgmma, online softmax in float32 registers (base 2), the elementwise mask
only on partial tile pairs (the plan's ``pair_full`` flags). Output through SMEM + TMA; the
float32 logsumexp is written ``[B*G, H, tokens]`` so one warpgroup's 64 rows are one contiguous
TMA box.

Relative positional bias (``st.rpb``): the kernel takes the class blocks
(`jna._src.rpb_tiles.tile_bias`, in base-2 units) as one more operand; per step a consumer loads
its 64 rows of the pair's block from GMEM into registers (issued before the ``Q K^T`` wgmma) and
adds them to the scaled logits before the mask and the row max.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jna.backends import tiling
from jna.backends.mosaic.common import (
    ROWS, WGMMA, WGMMA_COL, WGMMA_ROW, Static, key_coords, kv_tile_visits,
    launch, load_bias, mask_logits, query_windows, rows_of, smem, sync, iota, tile_rows,
)

_LOG2E = tiling.LOG2E
_LN2 = tiling.LN2
_MASK_VALUE = tiling.MASK_VALUE


def _forward_kernel(q_ref, k_ref, v_ref, tab_ref, bias_ref, o_ref, lse_ref, scoped, *, st: Static,
                    bg_count: int, ctas: int):
    (q_smem, k_smem, v_smem, lse_smem, p_smem), (q_bars, k_bars, v_bars), (k_free, v_free), sched = scoped
    plan, cfg = st.plan, st.config
    stages, nwg = cfg.num_stages, st.q_warpgroups
    tq, tk, dim = cfg.q_tokens, cfg.kv_tokens, st.head_dim
    wg = lax.axis_index("wg")

    def item_plan(bg, qt_flat):
        """Plan lookups of one Q tile (a few scalar loads from GMEM): ``(geo, qt, total, visit)``."""
        geo = tiling.Geometry(plan, tab_ref, bg)
        qt = tiling.unravel(qt_flat, [a.num_q_tiles for a in plan.axes])
        return (geo, qt, *kv_tile_visits(geo, qt))

    def consume(qt_flat, bg, head, planned, step0):
        """This warpgroup's 64 rows of one Q tile. ``step0``: the ring position of the tile's first
        KV step (0 with one CTA per Q tile; the running step count in the persistent kernel)."""
        geo, qt, total, _ = planned
        # A static 0 adds nothing: the one-CTA-per-tile kernel keeps its measured code exactly.
        # int32 operands: lax does not promote, and a Python int is int64 under jax_enable_x64.
        n_stages = np.int32(stages)
        ring = (lambda step: lax.rem(step, n_stages)) if isinstance(step0, int) and step0 == 0 else (
            lambda step: lax.rem(step0 + step, n_stages))
        q_slot, lse_slot = q_smem.at[wg], lse_smem.at[wg]
        base = qt_flat * tq + wg * ROWS
        # This warpgroup's 64 rows of the Q tile (the same rows of O on the way out).
        q_rows = tile_rows(q_ref, bg, head, qt, qt_flat, cfg.q_tile, wg * ROWS, ROWS, st.direct)
        for view, row, n in q_rows:
            plgpu.copy_gmem_to_smem(view, rows_of(q_slot, row, n, ROWS), q_bars.at[wg])
        windows = query_windows(geo, qt, cfg.q_tile, iota(ROWS, WGMMA_ROW, wg * ROWS))

        qk_scale = st.scale * _LOG2E
        m = plgpu.layout_cast(jnp.full((ROWS,), _MASK_VALUE, jnp.float32), WGMMA_ROW)
        l = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), WGMMA_ROW)
        acc = plgpu.layout_cast(jnp.zeros((ROWS, dim), jnp.float32), WGMMA)

        plgpu.barrier_wait(q_bars.at[wg])
        plgpu.barrier_wait(k_bars.at[ring(np.int32(0))])  # step 0 always exists
        if nwg > 1:
            pl.when(wg == 1)(lambda: sync(sched))

        def mask(s, kt):
            # Key coordinates are recomputed here rather than carried through the loop: as [tk]
            # column vectors they would pin tk/4 registers per axis for the whole loop.
            return mask_logits(s, windows, key_coords(kt, cfg.kv_tile, iota(tk, WGMMA_COL)), 0)

        cursor = tiling.TileWalk.kv_tiles(geo, qt)  # the odometer walk (no divisions)

        def body(step, carry):
            acc, m, l, offs = carry
            slot = ring(step)
            kt = cursor.tiles(offs)
            full = geo.full(qt, kt) > 0  # table loads issued ahead of the wgmma wait
            bias = None
            if bias_ref is not None:  # this warpgroup's rows of the pair's bias block (base 2)
                bias = load_bias(bias_ref, head, st.rpb.pair_class(qt, kt), pl.ds(wg * ROWS, ROWS))

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, q_slot, k_smem.at[slot].T)
                if nwg > 1:
                    sync(sched)
                return acc_ref[...]

            s = pl.run_scoped(qk, plgpu.ACC((ROWS, tk), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])

            # Raw logits s, m in scaled base-2 units: p = exp2(s * c - m) is one FMA per logit.
            # Masked logits are -inf (p = 0 exactly) while m starts finite (_MASK_VALUE), so a
            # row whose keys are all masked in this tile keeps m and gets p = 0, never NaN.
            # (A finite mask value would be wrong here: the compiler contracts s * c - m into
            # an FMA, and the rounding error of a huge masked s * c reaches exp2 as +-1e30.)
            if bias is None:
                s = lax.cond(full, lambda s: s, lambda s: mask(s, kt), s)
                m_new = jnp.maximum(m, s.max(axis=1) * qk_scale)
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(s * qk_scale - lax.broadcast_in_dim(m_new, s.shape, [0]))
            else:
                # The bias is added before the mask, so a masked pair is -inf whatever its bias.
                t = lax.cond(full, lambda t: t, lambda t: mask(t, kt), s * qk_scale + bias)
                m_new = jnp.maximum(m, t.max(axis=1))
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(t - lax.broadcast_in_dim(m_new, t.shape, [0]))
            l = l * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            p16 = p.astype(st.dtype)
            if nwg > 1:
                acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
                plgpu.barrier_arrive(sched)
                plgpu.barrier_wait(v_bars.at[slot])
                plgpu.barrier_wait(sched)
            else:
                plgpu.barrier_wait(v_bars.at[slot])

            def wait_next_k():
                @pl.when(step + 1 < total)
                def _():
                    plgpu.barrier_wait(k_bars.at[ring(step + 1)])

            if not st.simulated:  # FA3: P from registers, accumulate in place
                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                    wait_next_k()

                acc = pl.run_state(pv)(plgpu.ACC.init(acc))
            else:  # the simulator's wgmma reads A from SMEM only and has no run_state
                p_slot = p_smem.at[wg]
                p_slot[...] = p16
                plgpu.commit_smem()

                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p_slot, v_smem.at[slot])
                    wait_next_k()
                    return acc_ref[...]

                acc = acc + pl.run_scoped(pv, plgpu.ACC((ROWS, dim), jnp.float32))
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l, cursor.advance(offs)

        acc, m, l, _ = lax.fori_loop(0, total, body, (acc, m, l, cursor.start()))
        if nwg > 1:
            pl.when(wg == 0)(lambda: sync(sched))

        # Q's SMEM slot is free once this warpgroup's last Q K^T is done: it stages the output.
        q_slot[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(st.dtype)
        lse_slot[...] = (m + jnp.log2(l)) * _LN2
        plgpu.commit_smem()
        for (view, row, n), (out_view, _, _) in zip(q_rows, tile_rows(
                o_ref, bg, head, qt, qt_flat, cfg.q_tile, wg * ROWS, ROWS, st.direct)):
            plgpu.copy_smem_to_gmem(rows_of(q_slot, row, n, ROWS), out_view)
        plgpu.copy_smem_to_gmem(lse_slot, lse_ref.at[bg, head, pl.ds(base, ROWS)])
        plgpu.wait_smem_to_gmem(0)

    def issue(bg, kv_head, visit, step, slot, wait):
        """TMA of the KV tile of ``step`` into ring ``slot``; ``wait`` (a bool or a traced
        predicate): first observe the release of the slot by its previous readers."""
        kt, kt_flat = visit(step)
        for ref, buf, ready, free in ((k_ref, k_smem, k_bars, k_free), (v_ref, v_smem, v_bars, v_free)):
            if wait is True:
                plgpu.barrier_wait(free.at[slot])
            elif wait is not False:
                pl.when(wait)(lambda free=free: plgpu.barrier_wait(free.at[slot]))
            for view, row, n in tile_rows(ref, bg, kv_head, kt, kt_flat, cfg.kv_tile, 0, tk, st.direct):
                plgpu.copy_gmem_to_smem(view, rows_of(buf.at[slot], row, n, tk), ready.at[slot])

    def drain(steps):
        # Observe the consumers' releases of the last steps. Nearly free on the GPU (the producer
        # has nothing left to do); the simulator insists that every waiter of a barrier has seen
        # all of its phases before the barrier is deallocated.
        for s in range(stages):
            @pl.when(s < steps)
            def _():
                plgpu.barrier_wait(k_free.at[s])
                plgpu.barrier_wait(v_free.at[s])

    if not ctas:  # one CTA per (Q tile, batch*group, head)
        qt_flat, bg, head = lax.axis_index("q"), lax.axis_index("bg"), lax.axis_index("h")
        planned = item_plan(bg, qt_flat)  # shared by producer and consumers
        total, visit = planned[2], planned[3]

        @pl.when(wg < nwg)
        def _consumer():
            if nwg > 1:
                plgpu.set_max_registers(232, action="increase")
            consume(qt_flat, bg, head, planned, 0)

        @pl.when(wg == nwg)
        def _producer():
            if nwg > 1:
                plgpu.set_max_registers(40, action="decrease")
            kv_head = lax.div(head, np.int32(st.group))
            for i in range(stages):
                pl.when(i < total)(functools.partial(issue, bg, kv_head, visit, i, i, False))

            @pl.loop(0, total - stages)
            def _(i):
                issue(bg, kv_head, visit, i + stages, lax.rem(i, np.int32(stages)), True)

            drain(total)
        return

    # Persistent: ``ctas`` CTAs, each looping over the Q tiles cta, cta + ctas, ... (Q tile fastest,
    # then batch*group, then head). The producer runs ahead across tile boundaries, so the next
    # tile's first K/V tiles load while the consumers finish the current one.
    cta = lax.axis_index("cta")
    items = plan.num_q_tiles * bg_count * st.heads
    mine = lax.div(items - cta + ctas - 1, np.int32(ctas))

    def coords(i):
        it = cta + i * ctas
        n_q, n_bg = np.int32(plan.num_q_tiles), np.int32(bg_count)  # int32 under x64 too
        rest = lax.div(it, n_q)
        return lax.rem(it, n_q), lax.rem(rest, n_bg), lax.div(rest, n_bg)

    @pl.when(wg < nwg)
    def _consumer():
        if nwg > 1:
            plgpu.set_max_registers(232, action="increase")

        def item(i, step0):
            qt_flat, bg, head = coords(i)
            planned = item_plan(bg, qt_flat)
            consume(qt_flat, bg, head, planned, step0)
            return step0 + planned[2]

        lax.fori_loop(0, mine, item, jnp.int32(0))

    @pl.when(wg == nwg)
    def _producer():
        if nwg > 1:
            plgpu.set_max_registers(40, action="decrease")

        def item(i, step0):
            qt_flat, bg, head = coords(i)
            _, _, total, visit = item_plan(bg, qt_flat)
            kv_head = lax.div(head, np.int32(st.group))

            @pl.loop(0, total)
            def _(step):
                g = step0 + step
                issue(bg, kv_head, visit, step, lax.rem(g, np.int32(stages)), g >= stages)

            return step0 + total

        drain(lax.fori_loop(0, mine, item, jnp.int32(0)))


def forward_call(qp, kp, vp, st: Static, bias=None):
    """``qp`` ``[BG, Nq, H, D]``, ``kp``/``vp`` ``[BG, Nk, H_kv, D]`` (permuted by ``st.plan``)
    -> ``out`` ``[BG, Nq, H, D]``, ``lse`` ``[BG, H, Nq]`` float32 (natural log).

    With ``st.direct``: ``qp`` ``[B, *X, H, D]``, ``kp``/``vp`` ``[B, *X, H_kv, D]`` as the user
    passed them -> ``out`` ``[B, *X, H, D]``; ``lse`` stays in the plan's token order.

    ``bias`` (with ``st.rpb``): the relative positional bias's class blocks ``[H, C, Tq, Tk]``
    float32 in base-2 units (`jna._src.rpb_tiles.tile_bias` with ``scale=log2 e``)."""
    if (bias is None) != (st.rpb is None):
        raise ValueError("forward_call: bias blocks go with Static.rpb (both or neither)")
    plan, cfg = st.plan, st.config
    bg, nq = qp.shape[0], (math.prod(qp.shape[1:-2]) if st.direct else qp.shape[1])
    nwg, stages = st.q_warpgroups, cfg.num_stages
    # Persistent (st.ctas > 0): at most one CTA per Q tile of the whole call.
    ctas = min(st.ctas, plan.num_q_tiles * bg * st.heads)
    grid = dict(grid=(ctas,), grid_names=("cta",)) if ctas else dict(
        grid=(plan.num_q_tiles, bg, st.heads), grid_names=("q", "bg", "h"))

    def entry(q_ref, k_ref, v_ref, tab_ref, *refs):
        bias_ref, o_ref, lse_ref = refs if bias is not None else (None, *refs)
        scratch = (
            smem((nwg, ROWS, st.head_dim), st.dtype),
            smem((stages, cfg.kv_tokens, st.head_dim), st.dtype),
            smem((stages, cfg.kv_tokens, st.head_dim), st.dtype),
            plgpu.SMEM((nwg, ROWS), jnp.float32),
            smem((nwg, ROWS, cfg.kv_tokens), st.dtype) if st.simulated else None,
        )
        arrivals = (  # one arrival per TMA copy (several per tile in the direct layout)
            plgpu.Barrier(num_arrivals=st.q_runs, num_barriers=nwg),
            plgpu.Barrier(num_arrivals=st.kv_runs, num_barriers=stages),
            plgpu.Barrier(num_arrivals=st.kv_runs, num_barriers=stages),
        )
        consumed = (plgpu.Barrier(num_arrivals=nwg, num_barriers=stages),) * 2
        sched = plgpu.Barrier(num_arrivals=nwg) if nwg > 1 else None
        pl.run_scoped(
            lambda *scoped: _forward_kernel(q_ref, k_ref, v_ref, tab_ref, bias_ref, o_ref, lse_ref,
                                            scoped, st=st, bg_count=bg, ctas=ctas),
            scratch,
            arrivals,
            consumed,
            sched,
            collective_axes="wg",
        )

    out_type = [jax.ShapeDtypeStruct(qp.shape, qp.dtype), jax.ShapeDtypeStruct((bg, st.heads, nq), jnp.float32)]
    operands = (qp, kp, vp, jnp.asarray(plan.tables)) + (() if bias is None else (bias,))
    return launch(entry, st, out_type, grid, nwg + 1)(*operands)
