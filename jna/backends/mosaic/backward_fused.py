"""The one-kernel fused Mosaic GPU backward: dK, dV and dQ from one pass over each KV tile's
visit list, 5 matmuls per (KV tile, 64-query sub-tile) pair, where the two-kernel backward
(`jna.backends.mosaic.backward`: a dQ kernel and a dK/dV kernel, each recomputing S and dP)
does 7. FlashAttention-3's backward, with its deterministic dQ.

Grid: (KV tile, batch*group, kv head). Threads: ``nwg`` consumer warpgroups (64 K/V rows each;
``nwg = kv_tokens / 64``), a producer (TMA loads of the visited Q, dO, lse and delta, one
64-query sub-tile per step of a 2-stage SMEM ring) and a dQ writer.

Per visited sub-tile, consumer ``w`` (keys ``K_w``, values ``V_w``; ``c = scale log2 e``):

    S^T = K_w Q^T,  dP^T = V_w dO^T                          2 wgmmas
    P^T = exp2(S^T c - lse log2 e),  dS^T = P^T (dP^T - delta)
    dV_w += P^T dO,  dK_w += dS^T Q                          2 wgmmas
    dQ[:, chunk] = sum_i dS_i K_i[:, chunk]                  1 wgmma-equivalent per consumer

dS^T goes to SMEM (the dK wgmma reads it there, and so do both consumers' dQ wgmmas); each
consumer computes its share of dQ's 64-column chunks over all the CTA's keys, so the sum over the
CTA's keys happens inside the wgmmas. The sub-tile's dQ block (``[64, D]`` float32 in SMEM) goes
to a float32 dQ accumulator ``[BG, Nq, H, D]`` in GMEM: the writer stores it (the Q tile's first
visitor) or adds it with a TMA reduction; `dqkv_call` scales and casts it afterwards.

**Determinism.** The visitors of a Q tile add in a fixed order: their order in the Q tile's own
KV visit list (`tiling.TileWalk`: the flat KV tile order). Per (batch*group, query head, Q tile)
a GMEM semaphore counts the visitors done; visitor ``r`` waits until it reads ``r`` and adds 1
once its additions are complete (FlashAttention's deterministic mode). Visitor ``r`` only waits
for KV tiles of the same (batch*group, kv head) with a lower flat index; CTAs are launched KV tile
fastest, so those were launched before it and never wait for it: no deadlock.

**Relative positional bias** (``st.rpb``): ``P^T`` is recomputed with the transposed class blocks
(`transposed_probs`); ``d_rpb`` is `jna.backends.mosaic.rpb_grad`'s, as with the two-kernel
backward.

**Simulator.** The Mosaic GPU simulator (jax 0.11.2) has neither GMEM semaphores nor TMA
reductions, and runs the grid sequentially (so the order is fixed already): there the writer
adds by read-modify-write through SMEM and takes no semaphore. Everything else is the same code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jna.backends import tiling
from jna.backends.mosaic.backward import (
    _accumulate, _producer, issue_query_side, kv_program, load_kv_rows, store_dkv, transposed_probs,
)
from jna.backends.mosaic.common import ROWS, Static, launch, load_bias, smem, sync

_LOG2E = tiling.LOG2E
_STAGES = 2  # depth of the Q/dO/lse/delta ring (64-query sub-tiles)
_SUB = 64  # queries per sub-tile (the N of the score wgmmas)
# Per-lane registers of the producer and the writer: the minimum, so the consumers get 232
# (measured on an H200: with 40, i.e. 216 for the consumers, the backward took 1.3x as long).
_OTHER_REGISTERS = 24


def _chunk(dim: int) -> int:
    """Columns of dQ one consumer computes at a time (one 128-byte swizzle atom of K)."""
    return min(64, dim)


def _consumer_registers(nwg: int) -> int:
    """Per-lane registers of a consumer: what the 64K-register file leaves beside the producer
    and the writer, at most 240 (multiples of 8)."""
    free = 65536 - 2 * 128 * _OTHER_REGISTERS
    return min(240, free // (128 * nwg) // 8 * 8)


def _accumulate_smem(st: Static, acc, a_ref, b_ref):
    """``acc + a_ref @ b_ref`` with both operands in SMEM (in place on the GPU)."""
    if not st.simulated:
        def mma(acc_ref):
            plgpu.wgmma(acc_ref, a_ref, b_ref)

        return pl.run_state(mma)(plgpu.ACC.init(acc))

    def mma(acc_ref):
        plgpu.wgmma(acc_ref, a_ref, b_ref)
        return acc_ref[...]

    return acc + pl.run_scoped(mma, plgpu.ACC(acc.shape, jnp.float32))


def _kv_rank(geo: tiling.Geometry, qt, kt):
    """Position of KV tile ``kt`` in Q tile ``qt``'s KV visit list (the visitors' add order)."""
    walk = tiling.TileWalk.kv_tiles(geo, qt)
    return tiling.ravel([k - f for k, f in zip(kt, walk.firsts)], walk.counts)


def _kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, tab_ref, bias_ref, dk_ref, dv_ref, dq_ref,
            scratch, bars, *, st: Static, batch_groups: int):
    k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring, ds_smem, dq_stage, staging, dq_prev = scratch
    row_bars, ring_bars, free, ds_bar, dq_full, dq_empty, dq_loaded = bars
    plan, cfg = st.plan, st.config
    nwg, tq, tk, dim = st.kv_warpgroups, cfg.q_tokens, cfg.kv_tokens, st.head_dim
    subs = tq // _SUB
    chunk = _chunk(dim)

    kt_flat, bg, kv_head, wg, geo, kt, total, q_tile = kv_program(st, tab_ref)
    steps = total * subs  # ring steps: one sub-tile each

    def split(n):
        """Ring step ``n`` -> (visit, sub-tile within the visited Q tile). The visit list is
        walked backwards (the Q tiles in descending order), so this KV tile's rank among each Q
        tile's visitors rises from the first visit on: the visitor before it (KV tile ``kt - 1``
        in 1-D) added to that Q tile one visit earlier in its own loop, and CTAs running side by
        side need not wait for each other. Walked forwards, a CTA's first visit would have the
        highest rank and wait for CTAs up to the window's width before it to reach their last
        visit. (On an H200 both orders measured the same within noise, other costs dominating:
        benchmarks/results/h200_fused_backward_2026-12-01.md.)"""
        if subs == 1:
            visit, sub = n, 0
        else:
            n_subs = np.int32(subs)
            visit, sub = lax.div(n, n_subs), lax.rem(n, n_subs)
        return total - 1 - visit, sub

    @pl.when(wg < nwg)
    def _consumer():
        plgpu.set_max_registers(_consumer_registers(nwg), action="increase")
        rows = pl.ds(kt_flat * tk + wg * ROWS, ROWS)
        k_slot, v_slot = k_smem.at[wg], v_smem.at[wg]
        keys = load_kv_rows(k_ref, v_ref, k_slot, v_slot, row_bars, bg, rows, kv_head, wg, kt, st)

        def body(n, carry):
            dk, dv = carry
            slot = lax.rem(n, np.int32(_STAGES))
            visit, sub = split(n)
            jh, qt, _ = q_tile(visit)
            full = geo.full(qt, kt) > 0
            bias_t = None if bias_ref is None else load_bias(
                bias_ref, kv_head * st.group + jh, st.rpb.pair_class(qt, kt), pl.ds(wg * ROWS, ROWS),
                pl.ds(sub * _SUB, _SUB))
            for bar in ring_bars:
                plgpu.barrier_wait(bar.at[slot])
            q_sub, do_sub = q_ring.at[slot], do_ring.at[slot]
            p_t, ds_t = transposed_probs(st, geo, qt, keys, full, k_slot, v_slot, q_sub, do_sub,
                                         lse_ring.at[slot], delta_ring.at[slot], sub, bias_t)
            dv = _accumulate(st, dv, p_t.astype(st.dtype), do_sub,
                             staging.at[wg] if st.simulated else None)
            buf = lax.rem(n, np.int32(2))  # double-buffered: see the dQ step below
            ds_slot = ds_smem.at[buf, wg]
            ds_slot[...] = ds_t.astype(st.dtype)
            plgpu.commit_smem()
            dk = _accumulate_smem(st, dk, ds_slot, q_sub)
            plgpu.barrier_arrive(free.at[slot])  # Q, dO, lse, delta of this slot are read
            if nwg > 1:
                # Both consumers' dS^T are in SMEM. A consumer can only overwrite buffer ``buf``
                # two steps later, after the other has passed this barrier again, i.e. after
                # its dQ wgmmas below have read the buffer.
                sync(ds_bar)
            plgpu.barrier_wait(dq_empty)  # the writer has taken the previous dQ block

            def dq_chunk(c):
                cols = pl.ds(c * chunk, chunk)

                def mma(acc_ref):
                    for i in range(nwg):  # dQ[:, cols] = sum_i dS_i K_i[:, cols]
                        b = k_smem.at[i] if chunk == dim else k_smem.at[i, :, cols]
                        plgpu.wgmma(acc_ref, ds_smem.at[buf, i].T, b)
                    return acc_ref[...]

                block = pl.run_scoped(mma, plgpu.ACC((_SUB, chunk), jnp.float32))
                (dq_stage if chunk == dim else dq_stage.at[:, cols])[...] = block

            for c in range(dim // chunk):
                if nwg == 1:
                    dq_chunk(c)
                else:
                    pl.when(wg == c % nwg)(lambda c=c: dq_chunk(c))
            plgpu.commit_smem()
            plgpu.barrier_arrive(dq_full)
            return dk, dv

        zeros = plgpu.layout_cast(jnp.zeros((ROWS, dim), jnp.float32), plgpu.Layout.WGMMA)
        dk, dv = lax.fori_loop(0, steps, body, (zeros, zeros))
        plgpu.barrier_wait(dq_empty)  # the writer has taken the last dQ block
        store_dkv(st, dk, dv, k_slot, v_slot, dk_ref, dv_ref, bg, rows, kv_head)

    @pl.when(wg == nwg)
    def _producer_thread():
        plgpu.set_max_registers(_OTHER_REGISTERS, action="decrease")

        def issue(n, slot):
            visit, sub = split(n)
            j, _, qt_flat = q_tile(visit)
            issue_query_side((q_ref, do_ref, lse_ref, delta_ref), (q_ring, do_ring, lse_ring, delta_ring),
                             ring_bars, slot, bg, kv_head * st.group + j,
                             pl.ds(qt_flat * tq + sub * _SUB, _SUB))

        _producer(steps, issue, free)

    @pl.when(wg == nwg + 1)
    def _writer():
        plgpu.set_max_registers(_OTHER_REGISTERS, action="decrease")
        sems = None
        if not st.simulated:
            sems = pl.get_global(plgpu.SemaphoreType.REGULAR(
                (batch_groups * st.heads * plan.num_q_tiles,)))
        plgpu.barrier_arrive(dq_empty)  # the stage starts empty

        @pl.loop(0, steps)
        def _(n):
            visit, sub = split(n)
            j, qt, qt_flat = q_tile(visit)
            head = kv_head * st.group + j
            rank = _kv_rank(geo, qt, kt)
            dst = dq_ref.at[bg, pl.ds(qt_flat * tq + sub * _SUB, _SUB), head]
            plgpu.barrier_wait(dq_full)
            first = rank == 0
            if st.simulated:
                @pl.when(jnp.logical_not(first))
                def _():  # read-modify-write (no TMA reductions in the simulator)
                    plgpu.copy_gmem_to_smem(dst, dq_prev, dq_loaded)
                    plgpu.barrier_wait(dq_loaded)
                    dq_stage[...] = dq_stage[...] + dq_prev[...]
                    plgpu.commit_smem()

                plgpu.copy_smem_to_gmem(dq_stage, dst)
                plgpu.wait_smem_to_gmem(0)
                plgpu.barrier_arrive(dq_empty)
                return
            sem = sems.at[(bg * st.heads + head) * plan.num_q_tiles + qt_flat]

            @pl.when(jnp.logical_and(sub == 0, jnp.logical_not(first)))
            def _():  # the visitors before this one have added their blocks
                plgpu.semaphore_wait(sem, rank, decrement=False, memory_scope="gpu")

            pl.when(first)(lambda: plgpu.copy_smem_to_gmem(dq_stage, dst))
            pl.when(jnp.logical_not(first))(
                lambda: plgpu.copy_smem_to_gmem(dq_stage, dst, reduction_op="add"))
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            plgpu.barrier_arrive(dq_empty)

            @pl.when(sub == subs - 1)
            def _():  # this visitor's additions are complete: the next visitor may add
                plgpu.wait_smem_to_gmem(0)
                plgpu.semaphore_signal(sem, 1, memory_scope="gpu")


def dqkv_call(qp, kp, vp, dop, lse, delta, st: Static, bias_t=None):
    """``(dq, dk, dv)`` from permuted q/k/v/dO ``[BG, N, H(_kv), D]`` and ``lse``/``delta``
    ``[BG, H, Nq]``: dq ``[BG, Nq, H, D]`` in q's dtype, dk/dv ``[BG, Nk, H_kv, D]`` in k's.
    ``bias_t`` (with ``st.rpb``): the transposed class blocks ``[H, C, Tk, Tq]`` (base 2)."""
    if (bias_t is None) != (st.rpb is None):
        raise ValueError("bias blocks go with Static.rpb (both or neither)")
    plan, cfg = st.plan, st.config
    nwg, dim = st.kv_warpgroups, st.head_dim
    chunk = _chunk(dim)
    if cfg.q_tokens % _SUB:
        raise ValueError(f"{cfg}: the fused backward needs Q tiles of a multiple of {_SUB} tokens")

    def entry(*refs):
        if bias_t is None:  # the kernel's bias_ref
            refs = (*refs[:7], None, *refs[7:])
        scratch = (
            smem((nwg, ROWS, dim), st.dtype),  # K rows of each consumer
            smem((nwg, ROWS, dim), st.dtype),  # V rows
            smem((_STAGES, _SUB, dim), st.dtype),  # Q sub-tiles
            smem((_STAGES, _SUB, dim), st.dtype),  # dO sub-tiles
            plgpu.SMEM((_STAGES, _SUB), jnp.float32),  # lse
            plgpu.SMEM((_STAGES, _SUB), jnp.float32),  # delta
            # dS^T, double-buffered. The dK wgmma reads it beside B = Q [64, D], the dQ wgmma
            # (transposed) beside B = K [64, chunk]: its swizzle is that of a chunk-wide row.
            smem((2, nwg, ROWS, _SUB), st.dtype, row_elems=chunk),
            plgpu.SMEM((_SUB, dim), jnp.float32),  # the sub-tile's dQ block
            smem((nwg, ROWS, _SUB), st.dtype) if st.simulated else None,  # P^T (simulator)
            plgpu.SMEM((_SUB, dim), jnp.float32) if st.simulated else None,  # dQ so far (simulator)
        )
        bars = (
            (plgpu.Barrier(num_barriers=nwg),) * 2,  # K, V rows loaded
            (plgpu.Barrier(num_barriers=_STAGES),) * 4,  # ring slots loaded
            plgpu.Barrier(num_arrivals=nwg, num_barriers=_STAGES),  # ring slots free
            plgpu.Barrier(num_arrivals=nwg),  # both consumers' dS^T in SMEM
            plgpu.Barrier(num_arrivals=nwg),  # dQ block complete
            plgpu.Barrier(num_arrivals=1),  # dQ block taken by the writer
            plgpu.Barrier(),  # dQ accumulator loaded (simulator)
        )
        pl.run_scoped(lambda scratch, *bars: _kernel(*refs, scratch, bars, st=st,
                                                     batch_groups=qp.shape[0]),
                      scratch, *bars, collective_axes="wg")

    shape = jax.ShapeDtypeStruct(kp.shape, st.dtype)
    grid = dict(grid=(plan.num_kv_tiles, kp.shape[0], st.kv_heads), grid_names=("kv", "bg", "h"))
    dk, dv, dq = launch(entry, st, [shape, shape, jax.ShapeDtypeStruct(qp.shape, jnp.float32)],
                        grid, nwg + 2)(qp, kp, vp, dop, lse, delta, jnp.asarray(plan.tables),
                                       *(() if bias_t is None else (bias_t,)))
    return (dq * st.scale).astype(st.dtype), dk, dv
