"""Tile planner for the fused kernels (host side, numpy, cached).

The NA mask is an AND over axes, so everything a tiled kernel needs is separable: per axis,
which KV tiles each Q tile must visit, which of those (q tile, kv tile) pairs are *full* (every
real query of the Q tile may attend every key of the KV tile, so no elementwise mask is needed),
and the transpose (which Q tiles touch each KV tile) for the dK/dV pass. A multi-dimensional
tile pair is visited iff it is visited on every axis, and is full iff it is full on every axis.
The kernels loop over the product of the per-axis ranges.

Dilation is folded into the batch: within dilation group ``g`` an axis is a plain (undilated)
NA problem of length ``Lg = ceil((L - g) / d)`` in group coordinates ``x' = x // d``. Every group
is padded to the longest group and then to a multiple of the tile size; padded keys are masked,
padded queries are computed on a clamped window and dropped.

Query offsets (`AxisSpan`, spatial sharding's "offset" route): an axis may hold only some of the
problem's queries, global rows ``[q_start, q_start + q_len)``, against a slab of its keys, global
rows ``[kv_start, kv_start + kv_len)`` (both starts multiples of the dilation, so local row ``r``
stays in its global dilation group). Windows are the global problem's; the tables are in local
tile coordinates, and the kernels add the (static) group-coordinate origins where they evaluate
windows (`jna.backends.tiling.Geometry`).

Layout of the permuted tensors (`permute`): ``[B * G, num_tiles * tile_tokens, H, D]`` with
``G = prod(dilation)`` groups (row-major over axes, inside each batch entry), tiles row-major over
the tile grid, and tokens row-major inside each tile, so each tile is one contiguous block.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np

from jna import semantics

__all__ = ["AxisSpan", "AxisPlan", "TilePlan", "make_plan", "axis_pair_counts", "permute", "unpermute"]


@dataclasses.dataclass(frozen=True)
class AxisSpan:
    """The local extents of one axis (original coordinates): queries are the global rows
    ``[q_start, q_start + q_len)``, keys ``[kv_start, kv_start + kv_len)``. The starts must be
    multiples of the axis' dilation and every local query's window must lie in the key rows."""

    q_start: int
    q_len: int
    kv_start: int
    kv_len: int


@dataclasses.dataclass(frozen=True, eq=False)
class AxisPlan:
    """The tiling of one spatial axis, for every dilation group.

    Tables are indexed ``[g, q_tile]``, ``[g, kv_tile]`` or ``[g, q_tile, kv_tile]``:

    * ``kv_first``/``kv_count``: the contiguous range of KV tiles Q tile ``t`` visits (the union
      of its real queries' windows; a Q tile of padding only gets its group's last query's range,
      so that its discarded rows stay finite);
    * ``q_first``/``q_count``: the contiguous range of Q tiles with real queries whose windows
      touch KV tile ``t`` (0 for KV tiles of padding only);
    * ``pair_full``: the pair needs no mask on this axis.

    With ``region`` (the forward and dQ kernels' *key-region walk*, issue 16): a Q tile visits
    its key region, the union of its real queries' windows ``[start(first), stop(last))``, in
    ``kv_tile``-token chunks from a token origin that need not be a multiple of the tile
    (aligned tiles cover a 14-key region with up to two 8-key tiles, the region walk with one
    16-key chunk). ``kv_origin_tok``/``kv_steps`` ``[g, q_tile]``: the first chunk's first key (a
    local key coordinate, moved left where the last chunk would pass the group's end, and never
    below 0) and the number of chunks; ``region_full`` ``[g, q_tile, max_kv_steps]``: chunk
    ``j`` needs no mask. The dK/dV kernel walks the mirror image: for KV tile ``t``, the queries
    whose windows touch it, ``[first, last]``, in ``q_tile`` chunks: ``q_origin_tok``/``q_steps``
    ``[g, kv_tile]`` (0 steps: no query touches it) and ``region_q_full`` ``[g, kv_tile,
    max_q_steps]``. The aligned tables stay.
    """

    length: int
    kernel_size: int
    stride: int
    dilation: int
    is_causal: bool
    q_tile: int
    kv_tile: int
    group_lengths: tuple[int, ...]
    num_q_tiles: int
    num_kv_tiles: int
    kv_first: np.ndarray
    kv_count: np.ndarray
    q_first: np.ndarray
    q_count: np.ndarray
    pair_full: np.ndarray
    useful_pairs: int  # allowed (query, key) pairs on this axis, summed over groups
    computed_pairs: int  # pairs inside visited tile pairs, real Q tiles only
    # Query offsets (`AxisSpan`): local extents (original coordinates) and the group coordinate
    # of local query / key 0. Without a span: the whole axis, origins 0.
    q_length: int = -1
    kv_length: int = -1
    q_origin: int = 0
    kv_origin: int = 0
    # The key-region walk (``region``); None without it.
    kv_origin_tok: np.ndarray | None = None
    kv_steps: np.ndarray | None = None
    region_full: np.ndarray | None = None
    q_origin_tok: np.ndarray | None = None
    q_steps: np.ndarray | None = None
    region_q_full: np.ndarray | None = None

    @property
    def region(self) -> bool:
        return self.kv_steps is not None

    @property
    def max_kv_steps(self) -> int:
        """The last axis of ``region_full``: the most chunks any Q tile's key region takes."""
        return self.region_full.shape[-1] if self.region else 0

    @property
    def max_q_steps(self) -> int:
        """The last axis of ``region_q_full``: the most query chunks any KV tile takes."""
        return self.region_q_full.shape[-1] if self.region else 0

    def __post_init__(self):
        for name in ("q_length", "kv_length"):
            if getattr(self, name) < 0:
                object.__setattr__(self, name, self.length)

    @property
    def has_span(self) -> bool:
        return (self.q_length, self.kv_length, self.q_origin, self.kv_origin) != (self.length, self.length, 0, 0)

    @property
    def padded_group_length(self) -> int:
        return max(self.group_lengths)


@functools.lru_cache(maxsize=4096)
def axis_pair_counts(length, kernel_size, stride, dilation, is_causal, q_tile, kv_tile,
                     region: bool = False) -> tuple[int, int]:
    """``(useful, computed)`` (query, key) pairs of one axis for a tiling, summed over groups.

    ``useful``: allowed pairs; ``computed``: pairs inside the tile pairs a forward pass visits
    (Q tiles with real queries only, padding included; ``region``: the key-region walk's chunks,
    `AxisPlan`). Their ratio, multiplied over axes, is the tile efficiency that bounds a tiled
    kernel (`TilePlan.efficiency`). Vectorized, so tile choosers can score many candidates cheaply.
    """
    useful = computed = 0
    for g in range(dilation):
        lg = semantics.group_length(g, length, dilation)
        x = np.arange(lg)
        start = semantics.window_start(x, lg, kernel_size, stride, 1, is_causal)
        stop = semantics.window_stop(x, lg, kernel_size, stride, 1, is_causal)
        useful += int(np.sum(stop - start))
        lo = np.arange(0, lg, q_tile)
        hi = np.minimum(lo + q_tile, lg) - 1
        if region:
            counts = -(-(stop[hi] - start[lo]) // kv_tile)
        else:
            counts = (stop[hi] - 1) // kv_tile - start[lo] // kv_tile + 1
        computed += q_tile * kv_tile * int(np.sum(counts))
    return useful, computed


def _region_chunks(start, stop, lo, hi, lk, kv_tile):
    """The key-region walk of the Q tile with real queries ``lo..hi`` (``start``/``stop``: the
    queries' windows in local key coordinates, ``lk``: the group's local keys): ``(origin,
    count, full)``, the first chunk's first key, the number of ``kv_tile``-key chunks, and which
    chunks every real query may attend whole (`AxisPlan`)."""
    first, stop_last = int(start[lo]), int(stop[hi])
    count = -(-(stop_last - first) // kv_tile)
    origin = max(0, min(first, lk - count * kv_tile))  # in bounds where the group allows it
    k_lo = origin + kv_tile * np.arange(count)
    full = (start[hi] <= k_lo) & (stop[lo] >= k_lo + kv_tile) & (k_lo + kv_tile <= lk)
    return origin, count, full


def _query_chunks(start, stop, k_lo, k_hi, lq, q_tile):
    """The dK/dV kernel's walk of KV tile ``[k_lo, k_hi)`` (``k_hi`` may pass the keys' end: such a
    tile is never full): the real queries whose windows touch it (contiguous: windows move
    monotonically) in ``q_tile`` chunks: ``(origin, count, full)`` as in `_region_chunks`
    (``count`` 0 when no query touches it)."""
    touching = np.nonzero((start < k_hi) & (stop > k_lo))[0]
    if not len(touching):
        return 0, 0, np.zeros(0, bool)
    first, last = int(touching[0]), int(touching[-1])
    assert last - first + 1 == len(touching), "the queries of a KV tile must be contiguous"
    count = -(-(last + 1 - first) // q_tile)
    origin = max(0, min(first, lq - count * q_tile))
    lo = origin + q_tile * np.arange(count)
    hi = lo + q_tile - 1
    inside = hi < lq
    hi_c = np.minimum(hi, lq - 1)
    full = inside & (start[hi_c] <= k_lo) & (stop[np.minimum(lo, lq - 1)] >= k_hi)
    return origin, count, full


def _plan_axis(length, kernel_size, stride, dilation, is_causal, q_tile, kv_tile, span=None,
               region=False) -> AxisPlan:
    d = dilation
    q_start, q_len, kv_start, kv_len = (0, length, 0, length) if span is None else (
        span.q_start, span.q_len, span.kv_start, span.kv_len)
    if q_start % d or kv_start % d:
        raise ValueError(f"span {span}: query and key starts must be multiples of the dilation {d}")
    if not (0 <= q_start and q_start + q_len <= length and 0 <= kv_start and kv_start + kv_len <= length
            and q_len > 0 and kv_len > 0):
        raise ValueError(f"span {span} does not lie in an axis of length {length}")
    q_origin, kv_origin = q_start // d, kv_start // d
    groups = [semantics.group_length(g, length, d) for g in range(d)]
    q_groups = [semantics.group_length(g, q_len, d) for g in range(d)]
    kv_groups = [semantics.group_length(g, kv_len, d) for g in range(d)]
    if min(q_groups) == 0 or min(kv_groups) == 0:
        raise ValueError(f"span {span}: every dilation group (dilation {d}) needs a local query and key")
    nq, nk = math.ceil(max(q_groups) / q_tile), math.ceil(max(kv_groups) / kv_tile)
    kv_first = np.zeros((d, nq), np.int32)
    kv_count = np.zeros((d, nq), np.int32)
    q_first = np.zeros((d, nk), np.int32)
    q_count = np.zeros((d, nk), np.int32)
    pair_full = np.zeros((d, nq, nk), bool)
    regions = {}  # (g, qt) -> (origin, count, full): the key-region walk
    q_regions = {}  # (g, kt) -> (origin, count, full): its mirror for the dK/dV kernel
    useful = computed = region_computed = 0
    for g, (lg, lq, lk) in enumerate(zip(groups, q_groups, kv_groups)):
        # In group coordinates every group is an undilated problem of length lg; the local
        # queries are its rows q_origin + [0, lq), the local keys kv_origin + [0, lk).
        x = q_origin + np.arange(lq)
        start = semantics.window_start(x, lg, kernel_size, stride, 1, is_causal) - kv_origin
        stop = semantics.window_stop(x, lg, kernel_size, stride, 1, is_causal) - kv_origin
        if lq and (start.min() < 0 or stop.max() > lk):
            raise ValueError(f"span {span}: the windows of its queries reach keys outside its key rows "
                             f"(dilation group {g}: local keys [{start.min()}, {stop.max()}) of {lk})")
        useful += int(np.sum(stop - start))
        pair_any = np.zeros((nq, nk), bool)
        for qt in range(nq):
            lo, hi = qt * q_tile, min((qt + 1) * q_tile, lq) - 1  # real queries lo..hi
            real = lo <= hi
            if not real:
                lo = hi = lq - 1
            first, last = start[lo] // kv_tile, (stop[hi] - 1) // kv_tile
            kv_first[g, qt], kv_count[g, qt] = first, last - first + 1
            if region:
                regions[g, qt] = _region_chunks(start, stop, lo, hi, lk, kv_tile)
                region_computed += real * q_tile * kv_tile * regions[g, qt][1]
            if not real:
                continue
            pair_any[qt, first : last + 1] = True
            computed += q_tile * kv_tile * int(last - first + 1)
            for kt in range(first, last + 1):
                k_lo, k_hi = kt * kv_tile, (kt + 1) * kv_tile
                pair_full[g, qt, kt] = start[hi] <= k_lo and stop[lo] >= k_hi and k_hi <= lk
        for kt in range(nk) if region else ():
            q_regions[g, kt] = _query_chunks(start, stop, kt * kv_tile, (kt + 1) * kv_tile, lq, q_tile)
        for kt in range(nk):
            rows = np.nonzero(pair_any[:, kt])[0]
            if len(rows):
                q_first[g, kt], q_count[g, kt] = rows[0], rows[-1] - rows[0] + 1
                assert q_count[g, kt] == len(rows), "Q tiles of a KV tile must be contiguous"
    region_tables = {}
    if region:
        steps = max(count for _, count, _ in regions.values())
        region_tables = dict(
            kv_origin_tok=np.zeros((d, nq), np.int32), kv_steps=np.zeros((d, nq), np.int32),
            region_full=np.zeros((d, nq, steps), bool))
        for (g, qt), (origin, count, full) in regions.items():
            region_tables["kv_origin_tok"][g, qt] = origin
            region_tables["kv_steps"][g, qt] = count
            region_tables["region_full"][g, qt, :count] = full
        q_steps = max(1, max(count for _, count, _ in q_regions.values()))
        region_tables.update(
            q_origin_tok=np.zeros((d, nk), np.int32), q_steps=np.zeros((d, nk), np.int32),
            region_q_full=np.zeros((d, nk, q_steps), bool))
        for (g, kt), (origin, count, full) in q_regions.items():
            region_tables["q_origin_tok"][g, kt] = origin
            region_tables["q_steps"][g, kt] = count
            region_tables["region_q_full"][g, kt, :count] = full
        computed = region_computed  # what the forward computes
    return AxisPlan(
        length, kernel_size, stride, dilation, is_causal, q_tile, kv_tile, tuple(groups), nq, nk,
        kv_first, kv_count, q_first, q_count, pair_full, useful, computed,
        q_len, kv_len, q_origin, kv_origin, **region_tables,
    )


@dataclasses.dataclass(frozen=True, eq=False)
class TilePlan:
    """Per-axis plans of one problem plus the packed int32 table the kernels read.

    ``tables`` holds, per axis, ``kv_first, kv_count, q_first, q_count`` (each ``[d, n]``) and
    ``pair_full`` (``[d, nq, nk]``), then with the key-region walk ``kv_origin_tok, kv_steps``
    (``[d, nq]``), ``region_full`` (``[d, nq, max_kv_steps]``), ``q_origin_tok, q_steps``
    (``[d, nk]``) and ``region_q_full`` (``[d, nk, max_q_steps]``), flattened back to back;
    ``offsets[axis]`` gives where each starts, in that order.
    """

    axes: tuple[AxisPlan, ...]
    tables: np.ndarray
    offsets: tuple[tuple[int, int, int, int, int], ...]

    @property
    def rank(self) -> int:
        return len(self.axes)

    @property
    def num_groups(self) -> int:
        return math.prod(a.dilation for a in self.axes)

    @property
    def q_tile_tokens(self) -> int:
        return math.prod(a.q_tile for a in self.axes)

    @property
    def kv_tile_tokens(self) -> int:
        return math.prod(a.kv_tile for a in self.axes)

    @property
    def num_q_tiles(self) -> int:
        return math.prod(a.num_q_tiles for a in self.axes)

    @property
    def num_kv_tiles(self) -> int:
        return math.prod(a.num_kv_tiles for a in self.axes)

    def local_shape(self, kind: str) -> tuple[int, ...]:
        """The local spatial shape of the queries (``"q"``) or keys (``"kv"``): the problem's,
        unless an axis has a span (query offsets)."""
        return tuple(a.q_length if kind == "q" else a.kv_length for a in self.axes)

    @property
    def has_spans(self) -> bool:
        return any(a.has_span for a in self.axes)

    @property
    def region(self) -> bool:
        """Whether the forward and dQ kernels walk key regions (`AxisPlan`)."""
        return self.axes[0].region

    @property
    def efficiency(self) -> float:
        """Useful (query, key) pairs over pairs computed in visited tiles (forward pass)."""
        return math.prod(a.useful_pairs / a.computed_pairs for a in self.axes)

    def full_fraction(self, walk: str) -> float:
        """The fraction of the tile pairs a kernel's walk visits that need no mask: ``"kv"``, the
        Q tiles' walks over their keys (forward, dQ), ``"q"``, the KV tiles' walks over their
        queries (dK/dV); over every group and tile. A pair is full when it is full on every
        axis, so the per-axis fractions multiply."""
        fraction = 1.0
        for a in self.axes:
            if a.region:
                full, steps = (a.region_full, a.kv_steps) if walk == "kv" else (a.region_q_full, a.q_steps)
                visited, full = int(steps.sum()), int(full.sum())
            else:  # the aligned walks visit the same pairs from either side
                kt = np.arange(a.num_kv_tiles)
                first, count = a.kv_first[..., None], a.kv_count[..., None]
                inside = (kt >= first) & (kt < first + count)
                visited, full = int(inside.sum()), int((a.pair_full & inside).sum())
            fraction *= full / visited if visited else 0.0
        return fraction


@functools.lru_cache(maxsize=256)
def make_plan(params: semantics.NAParams, q_tile: tuple[int, ...], kv_tile: tuple[int, ...],
              spans: tuple[AxisSpan | None, ...] | None = None, region: bool = False) -> TilePlan:
    """Plans the tiling of ``params`` with Q tiles of shape ``q_tile`` and KV tiles ``kv_tile``;
    ``spans`` (one `AxisSpan` or None per axis): the local queries and keys of each axis
    (query offsets; None: the whole axis); ``region``: also plan the key-region walk
    (`AxisPlan`; for kernels that read keys in place at any token offset)."""
    if len(q_tile) != params.rank or len(kv_tile) != params.rank:
        raise ValueError(f"tile shapes {q_tile}, {kv_tile} must have {params.rank} entries")
    spans = spans or (None,) * params.rank
    if len(spans) != params.rank:
        raise ValueError(f"spans {spans} must have {params.rank} entries")
    axes = tuple(_plan_axis(*params.axis(a), q_tile[a], kv_tile[a], spans[a], region)
                 for a in range(params.rank))
    parts, offsets, cursor = [], [], 0
    for ax in axes:
        axis_offsets = []
        tables = [ax.kv_first, ax.kv_count, ax.q_first, ax.q_count, ax.pair_full]
        if region:
            tables += [ax.kv_origin_tok, ax.kv_steps, ax.region_full, ax.q_origin_tok, ax.q_steps,
                       ax.region_q_full]
        for table in tables:
            axis_offsets.append(cursor)
            parts.append(table.astype(np.int32).ravel())
            cursor += table.size
        offsets.append(tuple(axis_offsets))
    return TilePlan(axes, np.concatenate(parts), tuple(offsets))


def permute(x, plan: TilePlan, tile: str, padded_dim: int | None = None):
    """Reorders ``x`` ``[B, *X, H, D]`` into tile-contiguous ``[B * G, T * tile_tokens, H, D']``.

    Args:
      x: a q/k/v-like array.
      plan: the problem's tile plan.
      tile: ``"q"`` or ``"kv"``: which tiling to use.
      padded_dim: pad the last axis with zeros to this size (kernels want powers of two).
    """
    batch, heads, dim = x.shape[0], x.shape[-2], x.shape[-1]
    rank = plan.rank
    widths = [(0, 0)] * x.ndim
    shape = [batch]
    for a, ax in enumerate(plan.axes):
        t = ax.q_tile if tile == "q" else ax.kv_tile
        n_tiles = ax.num_q_tiles if tile == "q" else ax.num_kv_tiles
        widths[1 + a] = (0, n_tiles * t * ax.dilation - (ax.q_length if tile == "q" else ax.kv_length))
        shape += [n_tiles, t, ax.dilation]
    if padded_dim is not None:
        widths[-1] = (0, padded_dim - dim)
    x = jnp.pad(x, widths)
    x = x.reshape(*shape, heads, x.shape[-1])
    # [B, (n_a, t_a, d_a) per axis, H, D] -> [B, d_*, n_*, t_*, H, D]
    order = [0]
    order += [1 + 3 * a + 2 for a in range(rank)]
    order += [1 + 3 * a for a in range(rank)]
    order += [1 + 3 * a + 1 for a in range(rank)]
    order += [1 + 3 * rank, 2 + 3 * rank]
    x = x.transpose(order)
    return x.reshape(batch * plan.num_groups, -1, heads, x.shape[-1])


def unpermute(x, plan: TilePlan, tile: str, spatial_shape: tuple[int, ...], dim: int | None = None):
    """Inverse of `permute`: ``[B * G, T * tile_tokens, H, D']`` -> ``[B, *X, H, D]``.

    Works for arrays without the last axis too (``dim=None`` and ``x`` ``[B * G, T * t, H]``,
    e.g. the logsumexp).
    """
    rank = plan.rank
    trailing = x.shape[2:]
    batch = x.shape[0] // plan.num_groups
    tiles = [(ax.num_q_tiles, ax.q_tile) if tile == "q" else (ax.num_kv_tiles, ax.kv_tile) for ax in plan.axes]
    x = x.reshape(
        batch, *[ax.dilation for ax in plan.axes], *[n for n, _ in tiles], *[t for _, t in tiles], *trailing
    )
    # [B, d_*, n_*, t_*, ...] -> [B, (n_a, t_a, d_a) per axis, ...]
    order = [0]
    for a in range(rank):
        order += [1 + rank + a, 1 + 2 * rank + a, 1 + a]
    order += [1 + 3 * rank + i for i in range(len(trailing))]
    x = x.transpose(order)
    x = x.reshape(batch, *[n * t * ax.dilation for (n, t), ax in zip(tiles, plan.axes)], *trailing)
    x = x[(slice(None), *[slice(0, n) for n in spatial_shape])]
    if dim is not None:
        x = x[..., :dim]
    return x
