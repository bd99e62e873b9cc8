"""The gradient of fused-triton's relative positional bias (``d_rpb``), deterministic, no atomics.

The bias ``b[h, r]`` enters the scaled logit of every (query x, key y) pair at relative offset
``r = y' - x'`` (per axis, group coordinates): ``s_xy = scale q_x.k_y + b[h, r]``. So

    d_rpb[h, r] = sum over batch entries, dilation groups and the pairs at offset r of dS_xy,

with ``dS = P (dP - delta)`` the logits' gradient (the dQ kernel's ``ds``; no ``scale`` factor:
the bias is added after scaling).

Why a kernel of its own. A tile pair of a Q tile at origin ``qo`` and a KV chunk at origin
``ko`` has per-axis offsets ``(ko - qo) + j - i`` for its (query i, key j): binning its
``[TQ, TK]`` dS tile by offset is a sum along diagonals, a scatter that Triton (and Pallas
Triton) can do in a program only through atomics (whose order, hence float32 rounding, varies
from run to run), and per-CTA tables of ``prod(2K - 1)`` partial sums would not fit for large
windows (2d-flux: 25 281 entries, 3d-hunyuan: 77 315). But every pair with the same tile offset
``Delta = ko - qo`` (a vector over axes) bins its tile *the same way*. Hence:

1. `_kernel`, one program per (Delta, block of ``b`` batch * dilation group entries, query
   head): it visits every tile pair with that Delta in each entry of its block (the per-axis
   lists of `DeltaWalk`, products over axes like every walk of the plan), recomputes ``P`` (with
   the bias) and ``dP = dO V^T`` (two products per pair, where the dQ and dK/dV kernels take
   three and four), and sums the pairs' ``dS`` tiles in a float32 ``[TQ, TK]`` accumulator in a
   fixed order. Output: partials ``[nDelta, B*G / b, H, TQ, TK]`` float32. ``b``
   (`_batch_block`) is the largest power of two that keeps `MIN_PROGRAMS` programs: a program's
   fixed costs (its bias block, the partial tile it writes and XLA reads back) are paid once per
   ``b`` entries (H200, 2d-nat: ``b = 2``; 2d-dinat: ``b = 2``).
2. `_bin` (XLA, fixed order, no scatter, no atomics): sums the partials over ``B*G``, then bins
   each Delta's tile once, axis by axis: the diagonal sums of ``(i_a, j_a)`` by the skew trick
   (pad each row, reshape, sum) and the placement at offset ``Delta_a`` by padding and adding.

The pairs are those the forward visits: the aligned tile pairs of the plan, or where the kernels
walk key regions (`jna._src.plan.AxisPlan`, direct and grouped layouts only) the region chunks;
Q tiles of padding only are skipped (their ``dO`` is zero).

Memory: the partials take ``nDelta * B * G / b * H * TQ * TK * 4`` bytes (below: ``b = 1``); ``nDelta`` is the product
over axes of the distinct tile offsets, about ``(K_a + TQ_a + TK_a) / min(TQ_a, TK_a)`` per axis.
At the H200's tuned tiles (bf16): 1d-long 31 MiB (62 offsets), 2d-flux 257 MiB (19 x 18),
3d-hunyuan 1.2 GiB (15 x 10 x 11), 2d-nat 30 MiB, 2d-dinat 32 MiB (B * G = 256). To bound it,
the offsets are split along the first axis into launches of at most `PARTIALS_BUDGET_BYTES`
each (one offset of the first axis at least), each binned on its own and the binned tables
summed in order: 3d-hunyuan runs 5 launches of 3 first-axis offsets. Time: the pass recomputes
two of the backward's seven tile products per visited pair (about +30% of the backward's matrix
work) plus one bias block read per program (`fused._class_bias`; per pair a gather past the
blocks' budget).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from jna import semantics
from jna._src import plan as planning
from jna.backends.tiling import Geometry, as_int32, ravel, unravel
from jna.backends.triton.fused import (
    _LOG2E, _Specs, _Static, _add_pair_bias, _bias_part, _dot, _f32_products,
    _grid_batch, _load, _masked_probs, _pair_bias_operands, _params, _split_pair_bias, _tables,
)

__all__ = ["DeltaWalk", "delta_walk", "bias_gradient", "PARTIALS_BUDGET_BYTES"]

# Most bytes of partials one d_rpb launch writes (module docstring): 256 MiB.
PARTIALS_BUDGET_BYTES = 2**28


@dataclasses.dataclass(frozen=True, eq=False)
class DeltaWalk:
    """The forward's tile pairs grouped by tile offset ``Delta = ko - qo`` (token units, group
    coordinates), per axis and dilation group.

    Attributes:
      deltas: per axis, the sorted distinct offsets ``Delta_a`` (over every group).
      tables: packed int32, per axis: ``counts [d, nD]`` (pairs of group g at offset Delta_a),
        then ``q_tile``, ``kv_origin``, ``full`` ``[d, nD, max_count]`` (the pair's Q tile id,
        first key (local key coordinate) of its KV tile or chunk, and its no-mask flag).
      offsets: per axis, where each of the four tables starts in ``tables``.
      max_counts: per axis, the last dimension of the pair tables.
    """

    deltas: tuple[tuple[int, ...], ...]
    tables: np.ndarray
    offsets: tuple[tuple[int, int, int, int], ...]
    max_counts: tuple[int, ...]

    @property
    def num_deltas(self) -> int:
        return math.prod(len(d) for d in self.deltas)


def _axis_pairs(ax: planning.AxisPlan, g: int):
    """``[(q_tile, kv_origin, full)]`` of one axis and dilation group: the pairs the forward
    visits (aligned tiles or region chunks), Q tiles with real queries only."""
    lq = semantics.group_length(g, ax.q_length, ax.dilation)
    pairs = []
    for qt in range(ax.num_q_tiles):
        if qt * ax.q_tile >= lq:  # padding only: dO is zero there, nothing to add
            continue
        if ax.region:
            origin = int(ax.kv_origin_tok[g, qt])
            pairs += [(qt, origin + s * ax.kv_tile, int(ax.region_full[g, qt, s]))
                      for s in range(int(ax.kv_steps[g, qt]))]
        else:
            first = int(ax.kv_first[g, qt])
            pairs += [(qt, kt * ax.kv_tile, int(ax.pair_full[g, qt, kt]))
                      for kt in range(first, first + int(ax.kv_count[g, qt]))]
    return pairs


@functools.lru_cache(maxsize=256)
def delta_walk(plan: planning.TilePlan) -> DeltaWalk:
    """The `DeltaWalk` of a plan (host side, numpy; cached per plan object)."""
    deltas, parts, offsets, max_counts, cursor = [], [], [], [], 0
    for ax in plan.axes:
        by_group = [_axis_pairs(ax, g) for g in range(ax.dilation)]
        values = sorted({ko - qt * ax.q_tile for pairs in by_group for qt, ko, _ in pairs})
        index = {v: n for n, v in enumerate(values)}
        grouped = [[[] for _ in values] for _ in by_group]
        for g, pairs in enumerate(by_group):
            for qt, ko, full in pairs:
                grouped[g][index[ko - qt * ax.q_tile]].append((qt, ko, full))
        width = max(1, max(len(lst) for per_g in grouped for lst in per_g))
        counts = np.zeros((ax.dilation, len(values)), np.int32)
        entries = np.zeros((3, ax.dilation, len(values), width), np.int32)
        for g, per_g in enumerate(grouped):
            for n, lst in enumerate(per_g):
                counts[g, n] = len(lst)
                if lst:
                    entries[:, g, n, :len(lst)] = np.asarray(lst, np.int32).T
        axis_offsets = []
        for table in (counts, *entries):
            axis_offsets.append(cursor)
            parts.append(table.ravel())
            cursor += table.size
        deltas.append(tuple(values))
        offsets.append(tuple(axis_offsets))
        max_counts.append(width)
    return DeltaWalk(tuple(deltas), np.concatenate(parts), tuple(offsets), tuple(max_counts))


def _walk_operand(walk: DeltaWalk, st: _Static):
    """The walk's tables as a kernel operand (int32, padded to a power of two), followed (with
    class blocks, `_Static.bias_blocks`) by ``walk_classes``: per axis and offset id, the
    offset's part of the flat bias class (`bias_blocks.BiasClasses.lut` at that offset)."""
    parts = [walk.tables]
    if st.bias_blocks:
        classes = st.bias_classes
        for a, deltas in enumerate(walk.deltas):
            at = classes.lut_offsets[a] - classes.lut_lo[a] + np.asarray(deltas)
            parts.append(classes.lut[at])
    tables = np.concatenate(parts).astype(np.int32)
    padded = np.zeros(pl.next_power_of_2(max(tables.size, 16)), np.int32)
    padded[: tables.size] = tables
    return jnp.asarray(padded)


# Fewest d_rpb programs a launch keeps while each program sums several batch entries: a few per
# SM (an H200 has 132), so that the per-program costs (the bias block, the [TQ, TK] partial it
# writes and XLA then reads) are paid once per `batch_block` entries, not per entry.
MIN_PROGRAMS = 1024


def _batch_block(st: _Static, lead: int, programs: int) -> int:
    """How many consecutive entries of the operands' leading axis (``lead``: batch * groups, or
    batch entries in the grouped layout) one program sums over: the largest power of two
    dividing ``lead`` that keeps at least `MIN_PROGRAMS` programs (``programs`` at 1)."""
    block = 1
    while lead % (2 * block) == 0 and programs // (2 * block) >= MIN_PROGRAMS:
        block *= 2
    return block


class _Entry:
    """The view of a ref with a leading block of batch entries at entry ``n`` (traced): Pallas
    Triton lowers one indexer per load, so ``n`` joins the load's own index (`fused._load`
    indexes ``ref[index]`` and ``ref.at[index]``)."""

    def __init__(self, ref, n):
        self.ref, self.n = ref, n

    @property
    def shape(self):
        return self.ref.shape[1:]

    def __getitem__(self, index):
        return self.ref[(self.n, *index)]

    @property
    def at(self):
        entry = self

        class _At:
            def __getitem__(self, index):
                return entry.ref.at[(entry.n, *index)]

        return _At()


def _kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, tab_ref, walk_ref, *refs,
            st: _Static, walk: DeltaWalk, first: int, batch: int):
    """One program: the sum of ``dS`` over the pairs at one tile offset of ``batch`` consecutive
    (batch entry, group)s and one query head (grid: offset, batch*group block, head), written
    as a ``[TQ, TK]`` tile. ``first``: the launch's first offset id on axis 0 (`_chunks`).
    ``refs``: the bias operands (`fused._split_pair_bias`), then the output."""
    bias, (acc_ref,) = _split_pair_bias(st, refs)
    plan, cfg, lay = st.plan, st.config, st.layout
    f32 = _f32_products(st)
    tq, tk = plan.q_tile_tokens, plan.kv_tile_tokens
    ids = unravel(pl.program_id(0), [len(d) for d in walk.deltas])
    ids[0] = ids[0] + first
    k_local = Geometry.local_coords(cfg.kv_tile)
    q_local = Geometry.local_coords(cfg.q_tile)
    qk_scale = st.scale * _LOG2E
    block = None
    if st.bias_blocks:  # every pair of the program has this offset, hence this bias block
        at = walk.tables.size
        flat = None
        for a, deltas in enumerate(walk.deltas):
            c = walk_ref[at + ids[a]]
            flat = c if flat is None else flat + c
            at += len(deltas)
        block = bias[0][flat]  # base-2 units already (`fused._bias_inputs`)

    program = pl.program_id(1)  # outside the loops (interpret mode needs program ids here)

    def entry_sum(n, acc):
        n = as_int32(n)
        if lay.grouped:  # grid batch: (batch block, group); operands: [batch, ...] of the group
            groups = plan.num_groups
            bg = ((program // groups) * batch + n) * groups + program % groups
        else:
            bg = program * batch + n
        geo = Geometry(plan, tab_ref, bg)
        q_in, k_in, v_in, do_in, lse_in, delta_in = (
            _Entry(r, n) for r in (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref))
        # Per axis: this group's row of the offset's pair list.
        rows, counts = [], []
        for a in range(plan.rank):
            cell = geo.g[a] * len(walk.deltas[a]) + ids[a]
            counts.append(walk_ref[walk.offsets[a][0] + cell])
            rows.append(cell * walk.max_counts[a])
        total = functools.reduce(lambda x, y: x * y, counts)

        def entry(a, which, step):
            return walk_ref[walk.offsets[a][which] + rows[a] + step]

        def body(i, acc):
            steps = unravel(as_int32(i), counts)
            qt = [entry(a, 1, steps[a]) for a in range(plan.rank)]
            ko = [entry(a, 2, steps[a]) for a in range(plan.rank)]
            full = functools.reduce(lambda x, y: x * y, [entry(a, 3, steps[a]) for a in range(plan.rank)])
            qo = [t * e for t, e in zip(qt, cfg.q_tile)]
            q_tiles = lay.slices("q", qt, None if lay.direct or lay.grouped else
                                 ravel(qt, [a.num_q_tiles for a in plan.axes]))
            if lay.direct or lay.grouped:  # keys in place at any token origin (the region walk's too)
                k_tiles = tuple(pl.ds(o, e) for o, e in zip(ko, cfg.kv_tile))
            else:  # permuted: aligned tiles only (the region walk never runs there)
                kt = [o // e for o, e in zip(ko, cfg.kv_tile)]
                k_tiles = lay.slices("kv", kt, ravel(kt, [a.num_kv_tiles for a in plan.axes]))
            q = _load(q_in, st, "q", qo, (*q_tiles, slice(None))).reshape(tq, st.head_dim)
            do = _load(do_in, st, "q", qo, (*q_tiles, slice(None))).reshape(tq, st.value_dim)
            lse2 = _load(lse_in, st, "q", qo, q_tiles).reshape(tq) * _LOG2E
            delta = _load(delta_in, st, "q", qo, q_tiles).reshape(tq)
            k = _load(k_in, st, "kv", ko, (*k_tiles, slice(None))).reshape(tk, st.head_dim)
            v = _load(v_in, st, "kv", ko, (*k_tiles, slice(None))).reshape(tk, st.value_dim)
            x = [qo[a] + q_local[a] for a in range(plan.rank)]
            y = [ko[a] + k_local[a] for a in range(plan.rank)]
            s = _dot(q, k, trans_b=True, f32=f32) * qk_scale
            if block is not None:
                s = s + block
            else:
                s = _add_pair_bias(s, bias, st, qo, ko, lambda: _bias_part(st, x), lambda: _bias_part(st, y))
            spans = [geo.span(a, x[a]) for a in range(plan.rank)]
            p = _masked_probs(geo, full, spans, y, s, lse2)
            dp = _dot(do, v, trans_b=True, f32=f32)
            return acc + p * (dp - delta[:, None])

        return jax.lax.fori_loop(0, total, body, acc)

    acc_ref[...] = jax.lax.fori_loop(0, batch, entry_sum, jnp.zeros((tq, tk), jnp.float32))


def _chunks(st: _Static, walk: DeltaWalk, batch_groups: int) -> list[tuple[int, int]]:
    """``[(first, count)]``: the launches' ranges of offset ids on axis 0, each writing at most
    `PARTIALS_BUDGET_BYTES` of partials (at least one offset)."""
    n0 = len(walk.deltas[0])
    per_offset = (walk.num_deltas // n0) * batch_groups * st.heads * st.plan.q_tile_tokens * st.plan.kv_tile_tokens * 4
    step = max(1, min(n0, PARTIALS_BUDGET_BYTES // per_offset))
    return [(first, min(step, n0 - first)) for first in range(0, n0, step)]


def _partials(qp, kp, vp, dop, lse, delta, bias, st: _Static, walk: DeltaWalk, first: int, count: int):
    """``[count * nDelta / nD_0, B*G / b, H, TQ, TK]`` float32: `_kernel`'s per-offset sums of dS
    for the offsets ``first .. first + count - 1`` of axis 0 (every offset of the others), each
    over a block of ``b`` (batch entry, group)s (`_batch_block`)."""
    lay, plan = st.layout, st.plan
    spec = _Specs(st)
    tables, walk_tables = _tables(st), _walk_operand(walk, st)
    tq, tk = plan.q_tile_tokens, plan.kv_tile_tokens
    num = count * (walk.num_deltas // len(walk.deltas[0]))
    lead = qp.shape[0]  # batch * groups, or batch entries in the grouped layout
    batch = _batch_block(st, lead, num * _grid_batch(qp, st) * st.heads)
    grid_batch = _grid_batch(qp, st) // batch

    def whole_q(*trailing):  # every query token of the grid's query head h, `batch` entries
        if lay.grouped:
            return spec._grouped("q", None, trailing, lambda h: h, batch)
        return pl.BlockSpec((batch, *lay.token_shape("q"), None, *trailing),
                            lambda t, b, h: (b, *lay.zeros("q"), h, *(0,) * len(trailing)))

    bias_specs, bias = _pair_bias_operands(st, bias, spec)
    # The kernel unravels its offset id over the full per-axis counts; with `first` added on
    # axis 0, a launch of `count` axis-0 offsets covers program ids [0, num).
    return pl.pallas_call(
        functools.partial(_kernel, st=st, walk=walk, first=first, batch=batch),
        grid=(num, grid_batch, st.heads),
        in_specs=[
            whole_q(st.head_dim),
            spec.whole("kv", None, st.head_dim, batch=batch),
            spec.whole("kv", None, st.value_dim, batch=batch),
            whole_q(st.value_dim),
            whole_q(),
            whole_q(),
            spec.table(tables),
            pl.BlockSpec(walk_tables.shape, lambda t, b, h: (0,)),
            *bias_specs,
        ],
        out_specs=pl.BlockSpec((None, None, None, tq, tk), lambda t, b, h: (t, b, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((num, grid_batch, st.heads, tq, tk), jnp.float32),
        compiler_params=_params(st, backward=True),
        interpret=st.interpret,
        name="jna_fused_na_drpb",
    )(qp, kp, vp, dop, lse, delta, tables, walk_tables, *bias)


def _diagonal_sums(x, n: int, m: int):
    """``[..., n, m] -> [..., n + m - 1]``: ``out[..., u] = sum_i x[..., i, u + i - (n - 1)]``,
    i.e. the sum over (i, j) with ``j - i = u - (n - 1)`` (the skew trick: reverse the rows, pad
    each to ``n + m``, reinterpret the flat rows as rows of ``n + m - 1``: row ``i'`` moves
    right by ``i'``; then a plain sum over rows). Exact float32 sums of the entries, no scatter."""
    lead = x.shape[:-2]
    x = jnp.flip(x, axis=-2)
    x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, 0), (0, n)])  # [..., n, n + m]
    x = x.reshape(*lead, n * (n + m))[..., : n * (n + m - 1)]  # drops the last row's padding only
    return x.reshape(*lead, n, n + m - 1).sum(axis=-2)


def _place(x, deltas, n: int, kernel_size: int):
    """``[..., nD, U] -> [..., 2K - 1]``: the diagonal sums of each offset ``Delta`` (``u`` is
    the offset ``Delta + u - (n - 1)``) added at table index ``offset + K - 1``, in the order of
    ``deltas``; entries outside the table (pairs no window allows: zero) are dropped."""
    size, width = 2 * kernel_size - 1, x.shape[-1]
    total = None
    for d, delta in enumerate(deltas):
        start = delta - (n - 1) + kernel_size - 1  # table index of u = 0
        lo, hi = max(0, -start), min(width, size - start)
        if lo >= hi:
            continue
        piece = x[..., d, lo:hi]
        placed = jnp.pad(piece, [(0, 0)] * (piece.ndim - 1) + [(start + lo, size - (start + hi))])
        total = placed if total is None else total + placed
    if total is None:
        return jnp.zeros((*x.shape[:-2], size), x.dtype)
    return total


def _bin(partials, st: _Static, deltas):
    """``[nDelta, B*G, H, TQ, TK]`` partials of the per-axis offsets ``deltas`` -> their part of
    d_rpb ``[H, 2K_1 - 1, ..., 2K_n - 1]`` float32."""
    plan, rank, heads = st.plan, st.plan.rank, st.heads
    q_tile, kv_tile = st.config.q_tile, st.config.kv_tile
    x = partials.sum(axis=1)  # over batch entries and dilation groups: [nDelta, H, TQ, TK]
    x = x.reshape(*(len(d) for d in deltas), heads, *q_tile, *kv_tile)
    # -> [H, (nD_a, TQ_a, TK_a) per axis]
    order = [rank] + [i for a in range(rank) for i in (a, rank + 1 + a, 2 * rank + 1 + a)]
    x = x.transpose(order)
    for a, ax in enumerate(plan.axes):
        # axes: [H, (2K_b - 1) for b < a, nD_a, TQ_a, TK_a, (nD_b, TQ_b, TK_b) for b > a]
        p = 1 + a
        rest = x.ndim - (p + 3)
        x = jnp.moveaxis(x, (p, p + 1, p + 2), (-3, -2, -1))
        x = _diagonal_sums(x, q_tile[a], kv_tile[a])  # [..., nD_a, U_a]
        x = _place(x, deltas[a], q_tile[a], ax.kernel_size)  # [..., 2K_a - 1]
        x = jnp.moveaxis(x, -1, p)
        assert x.ndim == p + 1 + rest
    return x


def bias_gradient(qp, kp, vp, dop, lse, delta, bias, st: _Static):
    """d_rpb in the kernel layout ``[H, bias_padded]`` float32 (zero in the padding), from the
    backward's kernel-layout operands (`fused._fused_bwd`: dO in q's dtype, ``delta = rowsum(dO
    O) - dlse``) and the bias operands (`fused._bias_inputs` of the table). Deterministic:
    fixed-order sums in the kernel and fixed-shape reductions and additions in XLA (module
    docstring)."""
    walk = delta_walk(st.plan)
    table = None
    for first, count in _chunks(st, walk, _grid_batch(qp, st)):
        partials = _partials(qp, kp, vp, dop, lse, delta, bias, st, walk, first, count)
        part = _bin(partials, st, (walk.deltas[0][first:first + count], *walk.deltas[1:]))
        table = part if table is None else table + part
    table = table.reshape(st.heads, st.bias_size)
    return jnp.pad(table, ((0, 0), (0, st.bias_padded - st.bias_size)))
