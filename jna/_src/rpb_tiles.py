"""Relative positional bias for tiled kernels: the bias of a (Q tile, KV tile) pair as a dense
block, one block per *tile-offset class* (host-side plan, numpy, cached; and the XLA maps between
the bias table and the blocks).

Why blocks. The bias of query ``x`` and key ``y`` depends only on their relative offset
``y' - x'`` per axis (group coordinates, `jna.semantics.relative_position_index_of_key`). In a
tile pair (Q tile ``qt``, KV tile ``kt``) the tile-local query ``i`` and key ``j`` have
``y' - x' = delta + j - i`` per axis, with ``delta = kt * Tk - qt * Tq``. So the whole
``[Tq, Tk]`` bias block of a pair is a function of (head, ``delta`` per axis) alone: every pair
of the same *class* (the same ``delta`` on every axis) shares one block. Mosaic GPU has no
per-element gather from a table, so the kernels do not index ``rpb`` themselves: XLA expands the
table into these blocks once per call (`tile_bias`), and a kernel loads its pair's block
(``[64, Tk]`` rows of it) straight from GMEM into registers in the layout of its logits.

Cost. ``H * C * Tq * Tk`` float32 (``C = prod`` of the per-axis class counts, about
``(2K - 2 + Tq + Tk) / min(Tq, Tk)`` per axis), i.e. each table entry is repeated about ``Tq``
times; per visited tile pair a kernel reads ``Tq * Tk * 4`` bytes (mostly from L2: a block is
shared by every batch entry and Q tile of its class), as much as the K and V tiles together at
head dim 128. Small windows (the NAT/DiNAT use of the bias) give a few MB; 2d-flux-sized windows
(K = 80) several hundred MB per call. `RpbPlan.block_bytes` says how much.

The gradient. ``d_rpb`` is the sum of ``dS`` (the logits' gradient) over the batch and the
(query, key) pairs of each offset. A kernel sums the ``dS`` blocks of every pair of one class
(`jna.backends.mosaic.rpb_grad`): deterministic partial blocks, then `tile_bias_grad` maps the
blocks back to the table with fixed-order gathers and sums (the transpose of `tile_bias`'s gather,
with no scatter-add, whose float atomics would make it run-to-run nondeterministic on a GPU).

Everything here is in group coordinates of the plan (dilation folded into the batch); pairs of
the padding get blocks like any other (their logits are masked or their rows dropped).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from jna import semantics
from jna._src import plan as planning

__all__ = ["RpbAxis", "RpbPlan", "class_blocks", "class_index", "make_rpb_plan", "tile_bias", "tile_bias_grad"]


@dataclasses.dataclass(frozen=True, eq=False)
class RpbAxis:
    """The tile-offset classes of one axis.

    Attributes:
      kernel_size, q_tile, kv_tile: the axis' window and tile extents.
      origin, step, count: class ``c`` is ``delta = origin + c * step`` (``delta = kt * Tk -
        qt * Tq``, group coordinates); ``step = min(Tq, Tk)`` (tiles are powers of two, so every
        delta is a multiple of it).
      index, valid: ``[count, Tq, Tk]``: the bias index ``(delta + j - i) + K - 1`` of tile-local
        query ``i`` and key ``j`` (`semantics.relative_position_index_of_key`), clamped to
        ``[0, 2K - 2]``, and whether it was in range (out of range: never an allowed pair).
      inverse: ``[2K - 1, m]`` int32: for each bias index the flat ``(c, i, j)`` positions
        (``(c * Tq + i) * Tk + j``) holding it, padded with ``count * Tq * Tk`` (a zero).
      items_q, items_kv: ``[d, count, nq]`` int32: per dilation group and class, the Q tiles with
        real queries that visit a KV tile of that class, and that KV tile (the first
        ``items_count[g, c]`` entries).
      items_count: ``[d, count]`` int32.
    """

    kernel_size: int
    q_tile: int
    kv_tile: int
    origin: int
    step: int
    count: int
    index: np.ndarray
    valid: np.ndarray
    inverse: np.ndarray
    items_q: np.ndarray
    items_kv: np.ndarray
    items_count: np.ndarray

    def class_of(self, qt, kt):
        """The class of tile pair (``qt``, ``kt``) on this axis (ints, numpy or traced int32)."""
        delta = kt * self.kv_tile - qt * self.q_tile - self.origin
        if isinstance(delta, (int, np.integer, np.ndarray)):
            return delta // self.step
        shift = self.step.bit_length() - 1  # a power of two; delta >= 0 on visited pairs
        return lax.shift_right_arithmetic(delta, delta.dtype.type(shift)) if shift else delta


@dataclasses.dataclass(frozen=True, eq=False)
class RpbPlan:
    """The tile-offset classes of a `planning.TilePlan` (`make_rpb_plan`).

    ``tables`` packs, per axis, ``items_q``, ``items_kv`` and ``items_count`` (flattened back to
    back; ``offsets[axis]`` gives where each starts) for the kernel that sums ``dS`` per class.
    """

    axes: tuple[RpbAxis, ...]
    tables: np.ndarray
    offsets: tuple[tuple[int, int, int], ...]

    @property
    def counts(self) -> tuple[int, ...]:
        return tuple(a.count for a in self.axes)

    @property
    def num_classes(self) -> int:
        return math.prod(self.counts)

    @property
    def q_tokens(self) -> int:
        return math.prod(a.q_tile for a in self.axes)

    @property
    def kv_tokens(self) -> int:
        return math.prod(a.kv_tile for a in self.axes)

    def block_bytes(self, heads: int) -> int:
        """Bytes of the float32 blocks `tile_bias` makes for ``heads`` query heads."""
        return 4 * heads * self.num_classes * self.q_tokens * self.kv_tokens

    def pair_class(self, qt, kt):
        """Flat class id (row-major over axes) of tile pair ``qt``/``kt`` (per-axis tile ids)."""
        flat = None
        for ax, q, k in zip(self.axes, qt, kt):
            c = ax.class_of(q, k)
            flat = c if flat is None else flat * ax.count + c
        return flat


def class_index(deltas, q_tile: int, kv_tile: int, kernel_size: int):
    """``(index, valid)``, each ``[len(deltas), q_tile, kv_tile]``, of one axis: the bias index
    ``(delta + j - i) + K - 1`` of tile-local query ``i`` and key ``j`` in a tile pair whose KV
    tile starts ``delta`` tokens after its Q tile (group coordinates,
    `semantics.relative_position_index_of_key`), clamped to ``[0, 2K - 2]``, and whether it was in
    range (out of range: a pair no window allows)."""
    delta = np.asarray(deltas, np.int64)
    i = np.arange(q_tile)[None, :, None]
    j = np.arange(kv_tile)[None, None, :]
    raw = semantics.relative_position_index_of_key(i, delta[:, None, None] + j, kernel_size, 1)
    valid = (raw >= 0) & (raw <= 2 * kernel_size - 2)
    return np.clip(raw, 0, 2 * kernel_size - 2).astype(np.int32), valid


def _axis(ax: planning.AxisPlan) -> RpbAxis:
    """The classes of one axis from its tile plan (`RpbPlan`)."""
    if ax.is_causal or ax.stride != 1 or ax.has_span:
        raise NotImplementedError(
            "rpb (relative positional bias) tile blocks need non-causal, stride-1 axes without "
            f"query offsets (axis: causal={ax.is_causal}, stride={ax.stride}, span={ax.has_span})")
    tq, tk, k = ax.q_tile, ax.kv_tile, ax.kernel_size
    # Every pair any kernel visits (padding Q tiles included: the forward computes them too).
    deltas = {kt * tk - qt * tq for g in range(ax.dilation) for qt in range(ax.num_q_tiles)
              for kt in range(ax.kv_first[g, qt], ax.kv_first[g, qt] + ax.kv_count[g, qt])}
    step = min(tq, tk)
    origin = min(deltas)
    count = (max(deltas) - origin) // step + 1
    index, valid = class_index(origin + step * np.arange(count), tq, tk, k)
    flat = np.flatnonzero(valid)
    by_index = [flat[index.ravel()[flat] == u] for u in range(2 * k - 1)]
    width = max(1, max(len(p) for p in by_index))
    inverse = np.full((2 * k - 1, width), index.size, np.int32)
    for u, positions in enumerate(by_index):
        inverse[u, :len(positions)] = positions
    # The pairs that carry a gradient: Q tiles with real queries (dO is 0 on padding rows).
    nq = ax.num_q_tiles
    items_q = np.zeros((ax.dilation, count, nq), np.int32)
    items_kv = np.zeros((ax.dilation, count, nq), np.int32)
    items_count = np.zeros((ax.dilation, count), np.int32)
    for g in range(ax.dilation):
        real_q = semantics.group_length(g, ax.q_length, ax.dilation)
        for qt in range(nq):
            if qt * tq >= real_q:
                continue
            for kt in range(ax.kv_first[g, qt], ax.kv_first[g, qt] + ax.kv_count[g, qt]):
                c = (kt * tk - qt * tq - origin) // step
                n = items_count[g, c]
                items_q[g, c, n], items_kv[g, c, n] = qt, kt
                items_count[g, c] += 1
    return RpbAxis(k, tq, tk, origin, step, count, index, valid, inverse, items_q, items_kv, items_count)


@functools.lru_cache(maxsize=64)
def make_rpb_plan(plan: planning.TilePlan) -> RpbPlan:
    """The tile-offset classes of ``plan`` (non-causal, stride 1; cached per plan object)."""
    axes = tuple(_axis(ax) for ax in plan.axes)
    parts, offsets, cursor = [], [], 0
    for ax in axes:
        axis_offsets = []
        for table in (ax.items_q, ax.items_kv, ax.items_count):
            axis_offsets.append(cursor)
            parts.append(table.astype(np.int32).ravel())
            cursor += table.size
        offsets.append(tuple(axis_offsets))
    return RpbPlan(axes, np.concatenate(parts), tuple(offsets))


def _split_axes(rank: int):
    """Axis order ``[H, (c, i, j) per axis] <-> [H, c_*, i_*, j_*]`` of a ``[H, C, Tq, Tk]``
    array reshaped to per-axis extents."""
    grouped = [0]
    for a in range(rank):
        grouped += [1 + a, 1 + rank + a, 1 + 2 * rank + a]
    return grouped


def tile_bias(rpb, rplan: RpbPlan, scale: float = 1.0):
    """The bias blocks of every class: ``[H, C, Tq, Tk]`` float32.

    Args:
      rpb: ``[H, 2K_1 - 1, ..., 2K_n - 1]`` (float32 or a half type).
      rplan: the classes (`make_rpb_plan`).
      scale: multiplies the blocks (the Mosaic kernels keep logits in base-2 units: ``log2 e``).

    Returns:
      ``blocks[h, c, i, j] = scale * rpb[h, index_1, ..., index_n]`` with the per-axis indices of
      class ``c`` (row-major over axes), tile-local query ``i`` and key ``j`` (row-major inside
      the tiles, the plan's token order); 0 where an index is out of range (never an allowed
      pair). Not for autodiff (its transpose would be a scatter-add): `tile_bias_grad` is its
      deterministic adjoint.
    """
    return class_blocks(rpb, [(ax.index, ax.valid) for ax in rplan.axes], scale)


def class_blocks(rpb, axes, scale: float = 1.0):
    """`tile_bias` for any per-axis classes: ``axes[a] = (index, valid)`` of `class_index`
    (``[n_a, Tq_a, Tk_a]``). Returns ``[H, prod n_a, prod Tq_a, prod Tk_a]`` float32, classes
    and tile-local tokens row-major over axes; 0 where ``valid`` is False."""
    heads, rank = rpb.shape[0], len(axes)
    x = rpb.astype(jnp.float32) * scale
    for a, (index, valid) in enumerate(axes):  # [H, M_0, ..., M_(a-1), U_a, ...] -> [.., M_a, ..]
        x = jnp.take(x, index.ravel(), axis=1 + a)
        keep = valid.ravel().reshape([-1 if b == a else 1 for b in range(rank)])
        x = jnp.where(keep, x, 0.0)  # `where`: a non-finite entry must not reach other pairs
    x = x.reshape(heads, *[n for index, _ in axes for n in index.shape])
    x = x.transpose(np.argsort(_split_axes(rank)))  # -> [H, c_*, i_*, j_*]
    shapes = np.array([index.shape for index, _ in axes])  # [rank, 3]
    return x.reshape(heads, *(int(np.prod(shapes[:, n])) for n in range(3)))


def tile_bias_grad(d_blocks, rplan: RpbPlan):
    """The adjoint of `tile_bias` (``scale = 1``): ``d_rpb`` ``[H, 2K_1 - 1, ...]`` float32 from
    ``d_blocks`` ``[H, C, Tq, Tk]``.

    Per axis a gather (`RpbAxis.inverse`: the positions holding each index) and a sum over the
    gathered axis: the same additions in the same order on every run (no scatter-add).
    """
    heads, rank = d_blocks.shape[0], len(rplan.axes)
    x = d_blocks.astype(jnp.float32).reshape(
        heads, *rplan.counts, *[a.q_tile for a in rplan.axes], *[a.kv_tile for a in rplan.axes])
    x = x.transpose(_split_axes(rank))
    x = x.reshape(heads, *[a.count * a.q_tile * a.kv_tile for a in rplan.axes])
    for a, ax in enumerate(rplan.axes):  # [.., M_a, ..] -> [.., 2K_a - 1, ..]
        pad = [(0, 0)] * x.ndim
        pad[1 + a] = (0, 1)  # position M_a: the zero the padding of `inverse` points at
        x = jnp.take(jnp.pad(x, pad), ax.inverse, axis=1 + a)  # [.., 2K - 1, m, ..]
        x = jnp.sum(x, axis=2 + a)
    return x
