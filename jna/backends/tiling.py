"""Backend-neutral pieces shared by the fused kernels (Triton and Mosaic GPU).

Host side: the tile-shape search space (`axis_caps`, `tile_shapes`, `fit_tile`) and the tile
efficiency that scores it. In kernels: `Geometry`, the in-kernel view of a `jna._src.plan.TilePlan`
(this program's dilation group and group lengths, the per-axis visit ranges and full flags read
from the packed plan tables, and the edge masks built from the window functions of
`jna.semantics`), `TileWalk` (the one walk over the tiles a tile visits, used by every fused
kernel), plus `unravel`/`ravel` for tile and step indices.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from jna._src import plan as planning
from jna import semantics

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Finite "minus infinity" for masked logits: keeps exp2(masked - max) at 0 without inf - inf.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def axis_caps(params: semantics.NAParams) -> list[int]:
    """Largest useful tile extent per axis: the padded (power-of-two) longest group length."""
    return [pl.next_power_of_2(math.ceil(n / d)) for n, d in zip(params.spatial_shape, params.dilation)]


def fit_tile(tile: tuple[int, ...], params: semantics.NAParams, min_tokens: int = 16) -> tuple[int, ...]:
    """Shrinks tile extents beyond an axis' padded group length; grows to >= ``min_tokens``."""
    fitted = [min(t, cap) for t, cap in zip(tile, axis_caps(params))]
    # Triton's dot needs at least 16 rows/columns: grow the last axes (padding) if needed.
    axis = params.rank - 1
    while math.prod(fitted) < min_tokens:
        fitted[axis] *= 2
        axis = (axis - 1) % params.rank
    return tuple(fitted)


def normalize_tiles(config) -> None:
    """Validates a tile config's ``q_tile``/``kv_tile`` in its ``__post_init__`` (a frozen
    dataclass): stores them as tuples of ints; every extent a power of two; equal ranks."""
    owner = type(config).__name__
    for name in ("q_tile", "kv_tile"):
        tile = tuple(int(t) for t in getattr(config, name))
        object.__setattr__(config, name, tile)
        for t in tile:
            if t < 1 or t & (t - 1):
                raise ValueError(f"{owner}.{name} = {tile}: every extent must be a power of two")
    if len(config.q_tile) != len(config.kv_tile):
        raise ValueError(f"{owner}: q_tile {config.q_tile} and kv_tile {config.kv_tile} differ in rank")


def fit_config(config, params: semantics.NAParams, min_tokens: int):
    """``config`` (any tile config with ``q_tile``/``kv_tile``) with its tiles fitted to
    ``params`` (`fit_tile`): how an explicit config serves calls of other sizes."""
    if len(config.q_tile) != params.rank or len(config.kv_tile) != params.rank:
        raise ValueError(f"tile config {config} does not have {params.rank} axes (the call's rank).")
    fit = lambda tile: fit_tile(tile, params, min_tokens)
    return dataclasses.replace(config, q_tile=fit(config.q_tile), kv_tile=fit(config.kv_tile))


def config_source(backend: str, params: semantics.NAParams, head_dim: int, dtype: str,
                  tuned_speeds: bool) -> str:
    """Where a tiled backend's default config comes from, in words (`jna.explain`).

    The order is the one every tiled backend's ``default_config`` follows: this device's tuned
    config for exactly this problem, then the chooser (tile efficiency x class speed) with speeds
    tuned on this device (where the backend uses them, ``tuned_speeds``) or the shipped
    calibration. ``head_dim`` and ``dtype`` are the backend's tuned-table key.
    """
    from jna.tuning import tables as tuned  # here, not at import: tuned reads the device

    if tuned.exact(backend, params, head_dim, dtype) is not None:
        return "tuned table: this exact problem on this device"
    if tuned_speeds and tuned.class_speeds(backend, params.rank, head_dim, dtype):
        return "tile efficiency x class speeds tuned on this device"
    return "tile efficiency x calibrated class speeds"


def tile_shapes(tokens: int, caps: list[int]):
    """All per-axis power-of-two extents within ``caps`` whose product is ``tokens``."""
    if len(caps) == 1:
        if tokens <= caps[0]:
            yield (tokens,)
        return
    t = 1
    while t <= min(tokens, caps[0]):
        for rest in tile_shapes(tokens // t, caps[1:]):
            yield (t, *rest)
        t *= 2


def choose_tiles(params: semantics.NAParams, classes):
    """The launch class and per-axis tile shapes that maximize ``tile efficiency * speed``.

    ``classes``: ``(q_tokens, kv_tokens, speed, payload)`` tuples (``speed``: TFLOP/s at full tile
    efficiency, calibrated or tuned). Returns ``(payload, q_tile, kv_tile)``, or None when no class
    has tile shapes within the problem's padded extents.
    """
    caps = axis_caps(params)
    best, best_score = None, -1.0
    for q_tokens, kv_tokens, speed, payload in classes:
        for q_tile in tile_shapes(q_tokens, caps):
            for kv_tile in tile_shapes(kv_tokens, caps):
                score = tile_efficiency(params, q_tile, kv_tile) * speed
                if score > best_score:
                    best_score, best = score, (payload, q_tile, kv_tile)
    return best


def ranked_tiles(params: semantics.NAParams, q_tokens: int, kv_tokens: int, top: int, region: bool = False):
    """The ``top`` per-axis tile-shape pairs of one class by tile efficiency: ``[(eff, q, kv)]``
    (``region``: of the key-region walk)."""
    caps = axis_caps(params)
    scored = sorted(((tile_efficiency(params, q, kv, region), q, kv) for q in tile_shapes(q_tokens, caps)
                     for kv in tile_shapes(kv_tokens, caps)), key=lambda t: -t[0])
    return scored[:top]


def tile_efficiency(params: semantics.NAParams, q_tile, kv_tile, region: bool = False) -> float:
    """Useful over computed (query, key) pairs of a tiling (see `jna._src.plan.axis_pair_counts`;
    ``region``: the key-region walk's)."""
    eff = 1.0
    for a in range(params.rank):
        useful, computed = planning.axis_pair_counts(*params.axis(a), q_tile[a], kv_tile[a], region)
        eff *= useful / computed
    return eff


def unravel(index, radices):
    """Row-major unravel of a scalar index over static or dynamic radices (last fastest)."""
    parts = []
    for r in reversed(radices):
        parts.append(index % r)
        index = index // r
    return parts[::-1]


def ravel(parts, radices):
    flat = 0
    for p, r in zip(parts, radices):
        flat = flat * r + p
    return flat


def as_int32(index):
    """A scalar index as int32: returned as is (nothing traced) when it is int32 already.

    With ``jax_enable_x64`` on, the counter of a `jax.lax.fori_loop` with static bounds is int64
    (and Python ints are int64 in `jax.lax` ops); kernel index math stays int32.
    """
    return index if jnp.result_type(index) == jnp.int32 else jnp.asarray(index, jnp.int32)


def _table(tab_ref, offset, index):
    return tab_ref[offset + index]


class Geometry:
    """In-kernel view of the plan: group lengths, tile coordinates, ranges, masks."""

    def __init__(self, plan: planning.TilePlan, tab_ref, bg):
        self.plan, self.tab = plan, tab_ref
        axes = self.plan.axes
        g = bg % self.plan.num_groups
        self.g = unravel(g, [a.dilation for a in axes])
        # Length of this dilation group on each axis (a traced scalar): of the local keys (`lg`),
        # the local queries (`lg_q`) and the whole axis (`lg_window`, what windows are computed
        # on). They differ only under query offsets (`planning.AxisSpan`).
        group_len = lambda ga, a, n: semantics.group_length(ga, n, a.dilation)
        self.lg = [group_len(ga, a, a.kv_length) for ga, a in zip(self.g, axes)]
        self.lg_q = [lk if a.q_length == a.kv_length else group_len(ga, a, a.q_length)
                     for lk, ga, a in zip(self.lg, self.g, axes)]
        self.lg_window = [lk if a.length == a.kv_length else group_len(ga, a, a.length)
                          for lk, ga, a in zip(self.lg, self.g, axes)]

    # Per-axis local token coordinates inside a tile: [tokens] int32 vectors.
    @staticmethod
    def local_coords(tile: tuple[int, ...]):
        r = jnp.arange(math.prod(tile), dtype=jnp.int32)
        return unravel(r, tile)

    def kv_range(self, a: int, qt_a):
        ax, off = self.plan.axes[a], self.plan.offsets[a]
        idx = self.g[a] * ax.num_q_tiles + qt_a
        return _table(self.tab, off[0], idx), _table(self.tab, off[1], idx)

    def q_range(self, a: int, kt_a):
        ax, off = self.plan.axes[a], self.plan.offsets[a]
        idx = self.g[a] * ax.num_kv_tiles + kt_a
        return _table(self.tab, off[2], idx), _table(self.tab, off[3], idx)

    def kv_region(self, a: int, qt_a):
        """The key-region walk of Q tile ``qt_a`` on axis ``a``: ``(origin, steps)``, its first
        chunk's first key (local key coordinate) and its number of chunks (`planning.AxisPlan`)."""
        ax, off = self.plan.axes[a], self.plan.offsets[a]
        idx = self.g[a] * ax.num_q_tiles + qt_a
        return _table(self.tab, off[5], idx), _table(self.tab, off[6], idx)

    def region_full(self, qt, steps):
        """1 when chunk ``steps`` (per-axis chunk ids) of Q tile ``qt``'s key region needs no mask."""
        flag = None
        for a, ax in enumerate(self.plan.axes):
            idx = (self.g[a] * ax.num_q_tiles + qt[a]) * ax.max_kv_steps + steps[a]
            f = _table(self.tab, self.plan.offsets[a][7], idx)
            flag = f if flag is None else flag * f
        return flag

    def q_region(self, a: int, kt_a):
        """The dK/dV kernel's query walk of KV tile ``kt_a`` on axis ``a``: ``(origin, steps)``."""
        ax, off = self.plan.axes[a], self.plan.offsets[a]
        idx = self.g[a] * ax.num_kv_tiles + kt_a
        return _table(self.tab, off[8], idx), _table(self.tab, off[9], idx)

    def region_q_full(self, kt, steps):
        """1 when query chunk ``steps`` (per-axis chunk ids) of KV tile ``kt`` needs no mask."""
        flag = None
        for a, ax in enumerate(self.plan.axes):
            idx = (self.g[a] * ax.num_kv_tiles + kt[a]) * ax.max_q_steps + steps[a]
            f = _table(self.tab, self.plan.offsets[a][10], idx)
            flag = f if flag is None else flag * f
        return flag

    def full(self, qt, kt):
        """1 when tile pair (qt, kt) (per-axis lists) needs no mask on any axis."""
        flag = None
        for a, ax in enumerate(self.plan.axes):
            idx = (self.g[a] * ax.num_q_tiles + qt[a]) * ax.num_kv_tiles + kt[a]
            f = _table(self.tab, self.plan.offsets[a][4], idx)
            flag = f if flag is None else flag * f
        return flag

    def window(self, a: int, x):
        """Window [start, stop) of local group coordinates ``x`` on axis ``a`` (shared rules), in
        local key coordinates (under query offsets the window is the whole axis' at ``x`` plus
        the query origin, shifted by the key origin; the origins are static)."""
        ax = self.plan.axes[a]
        args = (self.lg_window[a], ax.kernel_size, ax.stride, 1, ax.is_causal)
        if ax.q_origin:
            x = x + ax.q_origin
        start, stop = semantics.window_start(x, *args, xp=jnp), semantics.window_stop(x, *args, xp=jnp)
        if ax.kv_origin:
            start, stop = start - ax.kv_origin, stop - ax.kv_origin
        return start, stop

    def span(self, a: int, x):
        """The window of local group coordinates ``x`` on axis ``a`` as `mask` reads it:
        ``(start, width)``, its first key (local key coordinates) and how many keys it allows,
        the stop clamped to the local keys (padding keys past the group length never count)."""
        start, stop = self.window(a, x)
        return start, jnp.maximum(jnp.minimum(stop, self.lg[a]) - start, 0)

    def mask(self, spans, y):
        """Allowed [TQ, TK] from per-axis query spans ([TQ] pairs, `span`) and key coords ([TK]).

        ``start <= y < start + width`` as one subtraction and one unsigned compare per axis (below
        the window ``y - start`` wraps past every width): on small windows nearly every tile
        pair is masked, and the mask is a large part of its per-logit work (issue 16)."""
        allowed = None
        for (start, width), ya in zip(spans, y):
            offset = (ya[None, :] - start[:, None]).astype(jnp.uint32)
            ok = offset < width[:, None].astype(jnp.uint32)
            allowed = ok if allowed is None else allowed & ok
        return allowed


class TileWalk:
    """The tiles one tile visits: the product of the per-axis ranges ``[first, first + count)`` the
    plan stores for it, in row-major order (last axis fastest). Every fused kernel walks its tile
    pairs with this (a Q tile's KV tiles in the forward and dQ kernels, a KV tile's Q tiles in the
    dK/dV kernels), so the visit order is defined once.

    Two ways to walk it: `at` unravels a step index (divisions by run-time counts: fine where the
    step is known ahead, e.g. a producer), the odometer `start`/`advance`/`tiles` carries per-axis
    offsets through the loop instead (one add and compare-and-select per axis: the fused-mosaic
    forward consumers, measured 6-12% faster on an H200 on the 2-D/3-D public problems; the same
    in the backward consumers changed forward+backward by -2% to +6%, within noise, so they unravel).

    Attributes:
      firsts, counts: per-axis first tile id and number of tiles (traced int32 scalars).
      radices: per-axis tile count of the visited kind (for flat tile ids).
      total: the number of steps, ``prod(counts)`` (every Q tile visits at least one KV tile).
    """

    def __init__(self, ranges, radices):
        self.firsts = [first for first, _ in ranges]
        self.counts = [count for _, count in ranges]
        self.radices = list(radices)
        self.total = functools.reduce(lambda x, y: x * y, self.counts)

    @classmethod
    def kv_tiles(cls, geo: "Geometry", qt) -> "TileWalk":
        """The KV tiles Q tile ``qt`` (per-axis ids) visits."""
        plan = geo.plan
        return cls([geo.kv_range(a, qt[a]) for a in range(plan.rank)],
                   [a.num_kv_tiles for a in plan.axes])

    @classmethod
    def q_tiles(cls, geo: "Geometry", kt) -> "TileWalk":
        """The Q tiles KV tile ``kt`` (per-axis ids) is visited by."""
        plan = geo.plan
        return cls([geo.q_range(a, kt[a]) for a in range(plan.rank)],
                   [a.num_q_tiles for a in plan.axes])

    def at(self, step):
        """Per-axis tile ids and the flat tile id of step ``step``."""
        offs = unravel(step, self.counts)
        tiles = [first + o for first, o in zip(self.firsts, offs)]
        return tiles, ravel(tiles, self.radices)

    def start(self):
        """Odometer offsets of step 0 (a tuple of int32 scalars, the loop carry)."""
        return tuple(jnp.int32(0) for _ in self.counts)

    def tiles(self, offs):
        """Per-axis tile ids at odometer offsets ``offs``."""
        return [first + o for first, o in zip(self.firsts, offs)]

    def advance(self, offs):
        """Odometer offsets of the next step."""
        new, carry = list(offs), None
        for a in reversed(range(len(offs))):
            bumped = offs[a] + (1 if carry is None else carry.astype(jnp.int32))
            if a == 0:  # the outermost axis never wraps within ``total`` steps
                new[a] = bumped
                break
            wrap = bumped >= self.counts[a]
            new[a] = jnp.where(wrap, 0, bumped)
            carry = wrap
        return tuple(new)
