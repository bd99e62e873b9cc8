"""fused-triton's relative positional bias as dense per-class blocks (host side and XLA).

The bias of query ``x`` and key ``y`` depends only on ``y' - x'`` per axis (group coordinates).
In a tile pair whose KV tile (or key-region chunk) starts ``delta_a`` tokens after its Q tile on
axis ``a``, tile-local query ``i`` and key ``j`` are at offset ``delta_a + j_a - i_a``: the pair's
whole ``[TQ, TK]`` bias block is a function of (head, ``delta`` on every axis) alone. Every pair
with the same ``delta`` vector (a *class*) shares one block. So XLA expands the ``[H, prod(2K - 1)]``
table once per call into ``[H, C, TQ, TK]`` float32 blocks (`blocks`), and a kernel reads its
pair's block with one coalesced, vectorized load (mostly from L2: a block is shared by every batch
entry and Q tile of its class) instead of gathering one table entry per logit from global memory
(the gather's per-element index arithmetic and scalar loads cost 2d-nat's forward 2.2x on an H200,
2d-flux's 5.2x; `benchmarks/results/h200_rpb_2026-12-02`).

The classes are the distinct per-axis offsets ``ko - qo`` of every pair any fused kernel visits:
the forward's and dQ's walk (aligned KV tiles, or key-region chunks at any token origin) over
every Q tile, padding included, and the dK/dV kernel's walk (aligned Q tiles, or query chunks).
A kernel finds its class through a per-axis lookup table indexed by ``delta - lo``
(`BiasClasses.lut`: the class id times its row-major stride, so the flat class is the sum over
axes). The region walk's offsets are not on a grid, hence a table rather than arithmetic.

Cost: ``H * C * TQ * TK * 4`` bytes (`BiasClasses.block_bytes`: 2d-nat 7 MiB, 2d-flux 257 MiB,
3d-hunyuan 1.2 GiB at their H200 tiles); past `BLOCKS_BUDGET_BYTES` the kernels gather from the
table instead (`jna.backends.triton.fused._bias`), slower but with no memory beyond the table.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from jna._src import plan as planning
from jna._src import rpb_tiles

__all__ = ["BLOCKS_BUDGET_BYTES", "BiasClasses", "bias_classes", "blocks", "lut_operand"]

# Most bytes of class blocks one call may materialize before the kernels gather instead: 2 GiB.
# H200, bf16 (benchmarks/results/h200_rpb_blocks_2026-12-02): 2d-flux's 257 MiB of blocks took
# its forward from 90.4 to 31.7 ms; 3d-hunyuan's 1.2 GiB from 427 to 222 ms (fwd+bwd 1370 ->
# 906 ms), its peak from 2.8 to 4.0 GiB. Lower it (a module variable, read when a call is
# traced) where memory is tighter than time.
BLOCKS_BUDGET_BYTES = 2**31


@dataclasses.dataclass(frozen=True, eq=False)
class BiasClasses:
    """The tile-offset classes of a plan's walks (`bias_classes`).

    Attributes:
      deltas: per axis, the sorted distinct offsets ``ko - qo`` (tokens, group coordinates).
      lut: int32, per axis back to back: entry ``delta - lut_lo[a]`` holds the class of
        ``delta`` times ``prod(len(deltas[b]) for b > a)`` (0 for offsets no walk visits).
      lut_offsets, lut_lo, lut_sizes: per axis, where its table starts in ``lut``, the offset of
        its entry 0, and its length.
      axes: per axis ``(index, valid)`` ``[n_a, TQ_a, TK_a]`` (`rpb_tiles.class_index`).
    """

    deltas: tuple[tuple[int, ...], ...]
    lut: np.ndarray
    lut_offsets: tuple[int, ...]
    lut_lo: tuple[int, ...]
    lut_sizes: tuple[int, ...]
    axes: tuple[tuple[np.ndarray, np.ndarray], ...]

    @property
    def num_classes(self) -> int:
        return math.prod(len(d) for d in self.deltas)

    def block_bytes(self, heads: int) -> int:
        """Bytes of the float32 blocks `blocks` makes for ``heads`` query heads."""
        tokens = math.prod(index.shape[1] * index.shape[2] for index, _ in self.axes)
        return 4 * heads * self.num_classes * tokens


def _walked_offsets(ax: planning.AxisPlan) -> set[int]:
    """The offsets ``ko - qo`` (tokens) of every tile pair a fused kernel visits on this axis,
    over every dilation group: forward/dQ (every Q tile) and dK/dV (every KV tile)."""
    tq, tk = ax.q_tile, ax.kv_tile
    out = set()
    for g in range(ax.dilation):
        for qt in range(ax.num_q_tiles):
            if ax.region:
                origin = int(ax.kv_origin_tok[g, qt])
                out.update(origin + s * tk - qt * tq for s in range(int(ax.kv_steps[g, qt])))
            else:
                first = int(ax.kv_first[g, qt])
                out.update(kt * tk - qt * tq for kt in range(first, first + int(ax.kv_count[g, qt])))
        for kt in range(ax.num_kv_tiles):
            if ax.region:
                origin = int(ax.q_origin_tok[g, kt])
                out.update(kt * tk - (origin + s * tq) for s in range(int(ax.q_steps[g, kt])))
            else:
                first = int(ax.q_first[g, kt])
                out.update(kt * tk - qt * tq for qt in range(first, first + int(ax.q_count[g, kt])))
    return out or {0}


@functools.lru_cache(maxsize=256)
def bias_classes(plan: planning.TilePlan) -> BiasClasses:
    """The classes of ``plan`` (host side, numpy; cached per plan object)."""
    deltas = [tuple(sorted(_walked_offsets(ax))) for ax in plan.axes]
    counts = [len(d) for d in deltas]
    parts, offsets, los, sizes, cursor = [], [], [], [], 0
    for a, d in enumerate(deltas):
        stride = math.prod(counts[a + 1:])
        lut = np.zeros(d[-1] - d[0] + 1, np.int32)
        lut[np.asarray(d) - d[0]] = np.arange(len(d), dtype=np.int32) * stride
        parts.append(lut)
        offsets.append(cursor)
        los.append(d[0])
        sizes.append(lut.size)
        cursor += lut.size
    axes = tuple(rpb_tiles.class_index(d, ax.q_tile, ax.kv_tile, ax.kernel_size)
                 for d, ax in zip(deltas, plan.axes))
    return BiasClasses(tuple(deltas), np.concatenate(parts), tuple(offsets), tuple(los),
                       tuple(sizes), axes)


def lut_operand(classes: BiasClasses):
    """The lookup tables as a kernel operand (int32, padded to a power of two for Triton)."""
    padded = np.zeros(pl.next_power_of_2(max(classes.lut.size, 16)), np.int32)
    padded[: classes.lut.size] = classes.lut
    return jnp.asarray(padded)


def blocks(table, classes: BiasClasses, kernel_sizes):
    """``[H, C, TQ, TK]`` float32 class blocks of a kernel-layout table ``[H, >= prod(2K - 1)]``
    (float32; entries past ``prod(2K - 1)`` are padding): ``blocks[h, c, i, j]`` is the bias of
    tile-local query ``i`` and key ``j`` in a pair of class ``c`` (row-major over axes), 0 where no
    window allows the pair. Not differentiated through (the kernels' callers own the gradient)."""
    sizes = [2 * k - 1 for k in kernel_sizes]
    rpb = table[:, : math.prod(sizes)].reshape(table.shape[0], *sizes)
    return rpb_tiles.class_blocks(rpb, classes.axes)
