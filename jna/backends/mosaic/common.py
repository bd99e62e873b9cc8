"""Pieces shared by the fused Mosaic GPU kernels (`mosaic_forward`, `mosaic_backward`).

`MosaicConfig` (tile shapes, pipeline depth), `Static` (everything static about one launch),
the SMEM operand layout for wgmma, the wgmma register layouts, and the in-kernel helpers the
kernels share: the visit lists read from the plan (`q_tile_visits`, `kv_tile_visits`, over
`jna.backends.tiling.TileWalk`), the
edge mask built from the shared window functions (`mask_logits`), and the relative positional
bias blocks' loads (`load_bias`; the blocks are `jna._src.rpb_tiles`).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jna._src import plan as planning
from jna._src import rpb_tiles
from jna.backends import tiling

BACKWARDS = ("fused", "split")  # `MosaicConfig.backward`
ROWS = 64  # rows per consumer warpgroup (the M of one wgmma)
WGMMA = plgpu.Layout.WGMMA
WGMMA_ROW = plgpu.Layout.WGMMA.reduce(1)  # a [64] vector along the rows of a WGMMA array
WGMMA_COL = plgpu.Layout.WGMMA.reduce(0)  # a [N] vector along its columns


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Tile shapes and pipeline depth of the fused Mosaic GPU kernels.

    ``q_tile``/``kv_tile``: per-axis extents (powers of two). A Q tile holds 64 or 128 tokens
    (one or two consumer warpgroups of 64 rows in the forward and dQ kernels), a KV tile 64 or
    128 tokens (one or two consumer warpgroups in the dK/dV kernel).
    ``num_stages``: depth of the forward's K/V SMEM ring (2 or 3; 3 with 128x128 tiles at D=128
    uses 224 KiB of the 227 KiB of SMEM). The backward kernels use 2 stages.
    ``direct_layout``: the forward reads Q/K/V tiles in place from ``[B, *X, H, D]`` and writes
    the output there (one TMA per contiguous run of the last axis; no token permutation) where
    the problem allows it (`direct_ok`). ``persistent``: the forward runs one CTA per SM, each
    looping over Q tiles, its producer loading the next tile's K/V while the consumers finish the
    current one (the per-CTA fixed cost is 12% of the 1-D public problems' kernel). Both off by
    default. Measured on an H200 (docs/performance.md): ``persistent`` is 1-10% faster on the
    six large public problems (bitwise-equal outputs), so their tuned entries turn it on;
    ``direct_layout`` measured 0-7% slower.
    ``backward``: ``"split"`` (the default), a dQ kernel and a dK/dV kernel (7 matmuls per tile
    pair: `jna.backends.mosaic.backward`), or ``"fused"``, one kernel per KV tile computing dK,
    dV and dQ (5 matmuls, dQ added in a fixed order: `jna.backends.mosaic.backward_fused`). Both
    are deterministic. Measured on an H200 (bf16, `python -m benchmarks variants`), "fused" takes
    1.3-1.45x the forward+backward time of "split" on the large public problems and 0.90-0.96x
    on 2d-nat/2d-dinat: docs/performance.md says where its time goes.
    At head dim 256 only 64-token tiles, 2 stages and ``"split"`` fit (SMEM, registers; the
    op rejects other configs there, naming the field).
    """

    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    num_stages: int = 2
    direct_layout: bool = False
    persistent: bool = False
    backward: str = "split"

    def __post_init__(self):
        tiling.normalize_tiles(self)
        if self.backward not in BACKWARDS:
            raise ValueError(f"MosaicConfig.backward = {self.backward!r}: must be one of {BACKWARDS}")
        for name in ("q_tile", "kv_tile"):
            if math.prod(getattr(self, name)) not in (64, 128):
                raise ValueError(f"MosaicConfig.{name} = {getattr(self, name)}: must hold 64 or 128 tokens")
        if self.num_stages not in (2, 3, 4):
            raise ValueError(f"MosaicConfig.num_stages = {self.num_stages}: must be 2, 3 or 4")

    @property
    def q_tokens(self) -> int:
        return math.prod(self.q_tile)

    @property
    def kv_tokens(self) -> int:
        return math.prod(self.kv_tile)


@dataclasses.dataclass(frozen=True)
class Static:
    """Everything static about one launch (hashable: a custom_vjp nondiff argument).

    ``plan`` is what `jna.backends.tiling.Geometry` reads. ``simulator``: Mosaic GPU simulator
    parameters, or None on the GPU. The simulator (jax 0.11.2) implements neither `pl.run_state`
    nor wgmma with its A operand in registers, so simulated kernels stage that operand (P, dS)
    through SMEM and accumulate into a fresh accumulator that is added; on the GPU they use
    FA3's in-place accumulation from registers. Everything else is the same code.
    """

    plan: planning.TilePlan
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    dtype: object
    config: MosaicConfig
    simulator: plgpu.InterpretGPUParams | None
    direct: bool = False  # the forward's tensors are [B, *X, H, D], not permuted (`direct_ok`)
    ctas: int = 0  # > 0: the forward is persistent with this many CTAs (at most)
    problem: object = None  # the call (`NAProblem`; forward mode's second-order term needs it)
    # The relative positional bias's tile-offset classes (`rpb_tiles.make_rpb_plan`) when the
    # kernels add a bias (their extra operand: the class blocks, `load_bias`); None without.
    rpb: rpb_tiles.RpbPlan | None = None

    @property
    def simulated(self) -> bool:
        return self.simulator is not None

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def q_warpgroups(self) -> int:
        return self.config.q_tokens // ROWS

    @property
    def kv_warpgroups(self) -> int:
        return self.config.kv_tokens // ROWS

    @property
    def column_parts(self) -> int:
        """Column blocks of the dK/dV kernel: 2 at head dim 256 (each CTA computes one half of dK
        and dV, since both ``[64, 256]`` float32 accumulators would need 256 registers per
        thread; S and dP are recomputed per half), else 1. With 2, the kernel's K/V rows and
        Q/dO ring hold ``[2, n, D / 2]`` column blocks (contiguous SMEM for TMA and wgmma)."""
        return 2 if self.head_dim > 128 else 1

    @property
    def q_runs(self) -> int:
        """TMA copies per warpgroup's 64 query rows (1 unless `direct`)."""
        return ROWS // min(self.config.q_tile[-1], ROWS) if self.direct else 1

    @property
    def kv_runs(self) -> int:
        """TMA copies per K (or V) tile (1 unless `direct`)."""
        tk = self.config.kv_tokens
        return tk // min(self.config.kv_tile[-1], tk) if self.direct else 1


def direct_ok(plan: planning.TilePlan) -> bool:
    """Whether tiles can be read in place from ``[B, *X, H, D]``: no dilation, every axis a
    multiple of both tiles (no padding: tile order is then the plan's token order), and runs of
    the last axis of at least 8 tokens (SMEM slices stay aligned to the 8-row swizzle tiles)."""
    return all(a.dilation == 1 and a.q_length % a.q_tile == 0 and a.kv_length % a.kv_tile == 0
               for a in plan.axes) and min(plan.axes[-1].q_tile, plan.axes[-1].kv_tile) >= 8


def tile_rows(ref, b, head, tile, tile_flat, tile_shape, start, count: int, direct: bool):
    """GMEM views of tokens ``[start, start + count)`` (tile-local, row-major) of one tile.

    Returns ``[(view [n, D], row, n)]``: copy ``view`` to rows ``[row, row + n)`` of the tile's
    ``[count, D]`` SMEM buffer. Permuted tensors ``[BG, N, H, D]``: one view. Direct
    (``[B, *X, H, D]``): one view per contiguous run of the last axis. ``start`` may be traced
    (a warpgroup's first row); ``count`` and the tile shape are static.
    """
    if not direct:
        tokens = math.prod(tile_shape)
        return [(ref.at[b, pl.ds(tile_flat * tokens + start, count), head], 0, count)]
    run = min(tile_shape[-1], count)
    views = []
    for r in range(count // run):
        local = pow2_unravel(start + r * run, tile_shape)
        index = [tile[a] * tile_shape[a] + local[a] for a in range(len(tile_shape) - 1)]
        last = pl.ds(tile[-1] * tile_shape[-1] + local[-1], run)
        views.append((ref.at[(b, *index, last, head)], r * run, run))
    return views


def rows_of(buf, row: int, n: int, count: int):
    """``buf`` (``[count, D]`` SMEM) or its rows ``[row, row + n)``."""
    return buf if n == count else buf.at[pl.ds(row, n)]


def smem(shape, dtype, row_elems: int | None = None):
    """SMEM tile in the wgmma operand layout: rows of at most 128 bytes swizzled as a whole
    ((8, 64) tiles with a 128-byte swizzle for 16-bit rows of >= 64 elements; (8, 32) with a
    64-byte swizzle for head dim 32). ``row_elems``: swizzle as for rows of that many elements
    instead of ``shape[-1]`` (to match the swizzle of the other wgmma operand)."""
    row_bytes = min(128, (row_elems or shape[-1]) * jnp.dtype(dtype).itemsize)
    columns = row_bytes // jnp.dtype(dtype).itemsize
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, columns)),
                                                plgpu.SwizzleTransform(row_bytes)))


def pow2_unravel(index, radices):
    """`jna.backends.tiling.unravel` for power-of-two radices and non-negative indices (shift, and)."""
    if isinstance(index, int):  # static: plain Python
        return tiling.unravel(index, radices)
    parts, shift = [], 0
    for r in reversed(radices):
        # A Python int shift would be int64 under jax_enable_x64 (lax does not promote).
        parts.append(lax.shift_right_logical(index, index.dtype.type(shift)) & (r - 1)
                     if shift else index & (r - 1))
        shift += r.bit_length() - 1
    return parts[::-1]


def sync(barrier):
    plgpu.barrier_arrive(barrier)
    plgpu.barrier_wait(barrier)


def kv_tile_visits(geo: tiling.Geometry, qt):
    """The KV tiles Q tile ``qt`` visits (`tiling.TileWalk`): ``(total, visit)``,
    ``visit(step) -> (kt, kt_flat)``."""
    walk = tiling.TileWalk.kv_tiles(geo, qt)
    return walk.total, walk.at


def q_tile_visits(geo: tiling.Geometry, kt, group: int):
    """The (query head, Q tile) pairs KV tile ``kt`` visits, heads outermost, the Q tiles of each
    head in `tiling.TileWalk` order.

    Returns ``(total, visit)``, ``visit(step) -> (j, qt, qt_flat)`` with ``j`` the query head
    within the kv head's group. A KV tile of padding only visits none.
    """
    walk = tiling.TileWalk.q_tiles(geo, kt)
    per_head = walk.total

    def visit(step):
        if group > 1:  # a static step as int32: lax does not promote (int64 under x64)
            step = np.int32(step) if isinstance(step, int) else step
        j, rest = (lax.div(step, per_head), lax.rem(step, per_head)) if group > 1 else (0, step)
        qt, qt_flat = walk.at(rest)
        return j, qt, qt_flat

    return per_head * group, visit


def query_windows(geo: tiling.Geometry, qt, q_tile, index):
    """Per axis ``(start, stop)`` of the windows of tile-local query indices ``index`` (a vector in
    any layout) of Q tile ``qt``, in group coordinates, the stop clamped to the group length (so
    padding keys are never allowed)."""
    local = pow2_unravel(index, q_tile)
    windows = []
    for a in range(geo.plan.rank):
        start, stop = geo.window(a, qt[a] * q_tile[a] + local[a])
        windows.append((start, jnp.minimum(stop, geo.lg[a])))
    return windows


def key_coords(kt, kv_tile, index):
    """Per axis group coordinates of tile-local key indices ``index`` of KV tile ``kt``."""
    local = pow2_unravel(index, kv_tile)
    return [kt[a] * kv_tile[a] + local[a] for a in range(len(kv_tile))]


def mask_logits(s, windows, keys, query_axis: int):
    """``s`` with the pairs outside the windows set to -inf.

    ``s`` is ``[64, N]`` in the WGMMA layout with queries along ``query_axis`` (0: rows, the
    forward and dQ kernels; 1: columns, the dK/dV kernel's transposed logits); ``windows`` are
    per-axis ``(start, stop)`` vectors along that axis and ``keys`` per-axis key coordinates
    along the other. Only compares and ands: the window rules were applied to the vectors.
    """
    key_axis = 1 - query_axis
    allowed = None
    for (start, stop), y in zip(windows, keys):
        lo = lax.broadcast_in_dim(start, s.shape, [query_axis])
        hi = lax.broadcast_in_dim(stop, s.shape, [query_axis])
        yy = lax.broadcast_in_dim(y, s.shape, [key_axis])
        ok = (lo <= yy) & (yy < hi)
        allowed = ok if allowed is None else allowed & ok
    return jnp.where(allowed, s, -jnp.inf)


def load_bias(bias_ref, head, cls, rows, cols=None):
    """Rows ``rows`` (and columns ``cols``) of head ``head``'s bias block of class ``cls``
    (`rpb_tiles.tile_bias`: ``bias_ref`` ``[H, C, rows, cols]`` float32 in GMEM) as a ``[64, n]``
    float32 array in the WGMMA layout, loaded straight from GMEM into registers.

    No SMEM and no TMA: the blocks are shared by many CTAs and sit in L2, and the rings' SMEM is
    full at the large tiles. Issue the load before the wgmma whose logits it is added to, so its
    latency overlaps the matmul. (``optimized=False``: Mosaic GPU's optimized transfers are for
    SMEM; a GMEM load is plain vectorized loads of the layout's 2-element vectors.)"""
    view = bias_ref.at[head, cls, rows] if cols is None else bias_ref.at[head, cls, rows, cols]
    return plgpu.load(view, layout=WGMMA, optimized=False)


def iota(n: int, layout, offset=0):
    return plgpu.broadcasted_iota(jnp.int32, (n,), 0, layout=layout) + offset


def launch(entry, st: Static, out_type, grid: dict, warpgroups: int):
    """``plgpu.kernel`` as every fused-mosaic kernel launches: ``warpgroups`` threads named
    ``"wg"``, fast approximate math, and no cross-warp reduction scratch (row max/sum in the
    wgmma layout reduce within warps, which leaves room for a third 128x128 K/V stage at D=128);
    in the simulator when ``st.simulator`` is set. ``grid``: ``grid=`` and ``grid_names=``."""
    return plgpu.kernel(
        entry,
        out_type=out_type,
        **grid,
        num_threads=warpgroups,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0),
        interpret=st.simulator,
    )
