"""The `fused-triton` backend: flash-style fused neighborhood attention with Pallas' Triton backend.

Data flow (docs/fused_triton.md):

1. `jna._src.plan.make_plan` tiles every axis (dilation groups folded into the batch) and lists, per
   axis, the KV tiles each Q tile visits, which pairs are *full*, and the transpose.
2. q/k/v are permuted so that every tile is contiguous (`jna._src.plan.permute`); head dims are
   padded to a power of two there (Triton needs power-of-two block shapes).
3. Forward kernel, one program per (Q tile, batch*group, head): an online softmax over the
   product of the per-axis KV tile ranges. Only pairs that are not full evaluate the
   elementwise mask (window spans from the shared functions of `jna.semantics`, in group
   coordinates; whether a walk branches on each pair's flag or masks every step is chosen from
   the plan, `walk_masking`); a second launch contains non-finite values where they leaked.
4. Backward: ``delta = rowsum(dO * O) - dlse`` in XLA; a dQ kernel over the same visit lists;
   a dK/dV kernel per KV tile over the transposed lists, summing over the query heads of a GQA
   group inside the program (deterministic, no atomics).
5. A relative positional bias (``rpb=``) enters every kernel as one dense block per tile pair,
   from per-class blocks that XLA expands once per call (`jna.backends.triton.bias_blocks`;
   gathered per logit from the table where the blocks would be too large, `_bias`); its
   gradient comes from `jna.backends.triton.bias_grad` (deterministic).

On a machine without a GPU the same kernels run in Pallas interpret mode (slow; for tests).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jna._src import plan as planning
from jna._src import forward_mode
from jna import semantics
from jna.tuning import tables as jna_tuned
from jna._src.arguments import NAProblem
from jna.backends import launch, tiling
from jna.backends.launch import LaunchClass
from jna.backends.triton import bias_blocks
from jna.backends.triton.common import (
    MIN_TILE_TOKENS,
    TritonBackend,
    F32_MAX as _F32_MAX,
    ONE as _ONE,
    ZERO as _ZERO,
    interpret as _interpret,
)
from jna.backends.tiling import (
    LN2 as _LN2,
    LOG2E as _LOG2E,
    MASK_VALUE as _MASK_VALUE,
    Geometry,
    TileWalk,
    as_int32,
    axis_caps,
    choose_tiles,
    fit_tile,
    ranked_tiles,
    unravel,
)

NAME = "fused-triton"


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """Tile shapes and launch parameters of the fused Triton kernels.

    ``q_tile``/``kv_tile``: per-axis tile extents (powers of two); the tokens per tile are their
    products (the backward kernels use the same tiling, so they share the token permutation).
    ``direct_layout``: read tiles in place from ``[B, *X, H, D]`` when the problem allows it
    (no dilation, every axis a multiple of the tiles); False always permutes tokens first.
    ``kv_region``: where tiles are read in place (the direct or grouped layout), the forward, dQ
    and tangent kernels walk each Q tile's exact key region in ``kv_tile`` chunks from any token
    offset (`jna._src.plan.AxisPlan`) instead of the aligned KV tiles covering it, and the dK/dV
    kernel walks each KV tile's touching queries in ``q_tile`` chunks: fewer, fuller steps for
    small windows (issue 16). Ignored in the permuted layout. A tuner field (the H200's tuned
    table picks it for the NAT/DiNAT layers and the small paper sweeps).
    """

    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    num_warps: int = 4
    num_stages: int = 2
    bwd_num_warps: int = 4
    bwd_num_stages: int = 1
    direct_layout: bool = True
    kv_region: bool = False

    def __post_init__(self):
        tiling.normalize_tiles(self)


@functools.lru_cache(maxsize=None)
def launch_classes() -> tuple[LaunchClass, ...]:
    """The launch classes of ``configs/fused_triton.json`` (launch parameters: ``num_warps``,
    ``num_stages``, ``bwd_num_warps``, ``bwd_num_stages``; a ``max_head_dim`` bucket each)."""
    return launch.load("fused_triton.json")


def _config(c: LaunchClass, q_tile, kv_tile) -> TritonConfig:
    p = dict(c.launch)
    return TritonConfig(q_tile, kv_tile, p["num_warps"], p["num_stages"], p["bwd_num_warps"],
                        p["bwd_num_stages"])


@functools.lru_cache(maxsize=1024)
def _choose(params: semantics.NAParams, dim: int, tuned_speeds: tuple = ()) -> TritonConfig:
    """Best class and tiles by ``tile efficiency x speed``; ``tuned_speeds`` (from `jna.tuning.tables`)
    replace the calibrated speeds and restrict the choice to the classes the tuner measured."""
    classes = launch.for_head_dim(launch_classes(), dim)
    speeds = {c: c.speed for c in classes}
    if tuned_speeds:
        measured = dict(tuned_speeds)
        tuned = {c: measured[c.key] for c in classes if c.key in measured}
        speeds = tuned or speeds
    best = choose_tiles(params, [(c.q_tokens, c.kv_tokens, speed, c) for c, speed in speeds.items()])
    if best is None:  # the whole (padded) map is smaller than every tile class: one tile per group
        c = min(classes, key=lambda c: c.q_tokens)
        tile = fit_tile(tuple(axis_caps(params)), params)
        return _config(c, tile, tile)
    c, q_tile, kv_tile = best
    return _config(c, q_tile, kv_tile)


def config_from_dict(fields: dict) -> TritonConfig:
    """A `TritonConfig` from its fields as stored in JSON (lists for the tiles)."""
    return TritonConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def config_source(problem: NAProblem) -> str:
    """Where `default_config` takes this problem's config from (`tiling.config_source`)."""
    return tiling.config_source(NAME, problem.params,
                                max(problem.head_dim, problem.value_dim),
                                jnp.dtype(problem.dtype).name, tuned_speeds=True)


def default_config(problem: NAProblem) -> TritonConfig:
    """The tile config for ``problem``: this device's tuned config for exactly this problem
    (`jna.tuning.tables`); else the launch class and per-axis tile shapes that maximize ``tile efficiency
    * speed`` (speeds tuned on this device when the tuned table has the problem's backend, rank,
    head dim and dtype; the shipped calibration otherwise). An explicit config is given through
    the backend instance instead (`FusedTriton(config)`).
    """
    dim = max(problem.head_dim, problem.value_dim)
    dtype = jnp.dtype(problem.dtype).name
    found = jna_tuned.exact(NAME, problem.params, dim, dtype)
    if found is not None:
        return config_from_dict(found)
    return _choose(problem.params, dim, jna_tuned.class_speeds(NAME, problem.rank, dim, dtype))


# ----------------------------------------------------------------------------------------------
# Static geometry shared by the kernels
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything static about one kernel launch (hashable: a custom_vjp nondiff argument)."""

    plan: planning.TilePlan
    heads: int
    kv_heads: int
    head_dim: int  # padded to a power of two
    value_dim: int  # padded
    scale: float
    dtype: object
    config: TritonConfig
    interpret: bool
    layout: "_Layout"
    problem: NAProblem | None = None  # the call (forward mode's second-order term needs it)
    bias: bool = False  # the kernels take a relative positional bias table (`_bias_table`)

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def bias_size(self) -> int:
        """Entries of one head's flat bias table, ``prod(2K - 1)``."""
        return math.prod(2 * a.kernel_size - 1 for a in self.plan.axes)

    @property
    def bias_padded(self) -> int:
        """The kernel-layout table's row length: `bias_size` rounded up to a power of two."""
        return pl.next_power_of_2(self.bias_size)

    @property
    def bias_classes(self) -> "bias_blocks.BiasClasses":
        return bias_blocks.bias_classes(self.plan)

    @property
    def bias_blocks(self) -> bool:
        """Whether the kernels read the bias as per-class blocks (`bias_blocks`) rather than
        gathering it from the table: with a bias, where the blocks fit `BLOCKS_BUDGET_BYTES`."""
        return self.bias and self.bias_classes.block_bytes(self.heads) <= bias_blocks.BLOCKS_BUDGET_BYTES


def _f32_products(st: "_Static"):
    """How a launch multiplies float32 operands (None: half-precision inputs, the default dot).

    ``"tf32x3"``: three TF32 tensor-core products (the operands split into high and low TF32
    parts, ~1e-6 relative error, as in `jna.backends.triton.unfused`) rather than Triton's
    exact ``ieee`` dot on the CUDA cores (issue 16: 2d-nat forward 0.30 ms with tf32x3 on an
    H200, half of unfused's). Head dims above 128 keep ``"ieee"``: the split operands' tiles
    exceed the shared memory there (H200: 320 KiB requested at D=256). Interpret mode keeps
    exact float32 (XLA:CPU has no TF32 algorithms).
    """
    if st.dtype != jnp.float32:
        return None
    return "ieee" if st.interpret or max(st.head_dim, st.value_dim) > 128 else "tf32x3"


def _dot(a, b, trans_a=False, trans_b=False, f32=None):
    """Tensor-core product with float32 accumulation; ``f32``: `_f32_products` of the launch."""
    precision = {None: None, "ieee": jax.lax.Precision.HIGHEST,
                 "tf32x3": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3}[f32]
    return pltriton.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


# ----------------------------------------------------------------------------------------------
# Layouts: where a tile's tokens live in the arrays the kernels see
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Token addressing of the kernel operands.

    *Permuted* (the general case): q/k/v were reordered by `jna._src.plan.permute` into
    ``[B * G, tiles * tile_tokens, H, D]``; a tile is one contiguous run of the single token
    axis. *Direct* (no dilation, every axis a multiple of both tile extents, head dims already
    powers of two): the kernels read tiles straight out of ``[B, *X, H, D]`` as
    ``[*tile_extents, D]`` blocks, and no permutation copies are made. *Grouped* (every axis a
    multiple of its dilation, head dims powers of two; dilation or tiles that do not divide the
    group lengths): the operands are ``[B, *X, H, D]`` viewed (a free reshape) as
    ``[B, Lg_1, d_1, ..., Lg_n, d_n, H, D]``, so a dilation group is a strided sub-array the
    kernels index in place; every operand is handed over whole per (batch, group, head) and the
    kernels load and store their tiles themselves, masked where a tile runs past the group length
    (issue 16: the permutation copies were half of 2d-dinat's forward on an H200).

    ``token_shape(kind)``: the token axes of an operand; ``block(kind)``: one tile's extents on
    them; ``index(kind, t)``: block indices of tile ``t`` (a flat tile id, traced).
    """

    direct: bool
    plan: planning.TilePlan
    grouped: bool = False

    def _tiles(self, kind):
        axes = self.plan.axes
        if kind == "q":
            return [a.q_tile for a in axes], [a.num_q_tiles for a in axes]
        return [a.kv_tile for a in axes], [a.num_kv_tiles for a in axes]

    def token_shape(self, kind) -> tuple[int, ...]:
        extents, counts = self._tiles(kind)
        if self.grouped:
            return self.group_lengths(kind)
        if self.direct:
            return tuple(e * n for e, n in zip(extents, counts))
        return (math.prod(extents) * math.prod(counts),)

    def block(self, kind) -> tuple[int, ...]:
        extents, _ = self._tiles(kind)
        return tuple(extents) if self.direct or self.grouped else (math.prod(extents),)

    def index(self, kind, t) -> tuple:
        if self.direct:
            return tuple(unravel(t, self._tiles(kind)[1]))
        return (t,)

    def zeros(self, kind) -> tuple:
        return (0,) * len(self.token_shape(kind))

    def slices(self, kind, tile, tile_flat) -> tuple:
        """In-kernel slices selecting a tile (per-axis tile ids and flat id) of a whole-map ref."""
        extents, _ = self._tiles(kind)
        if self.direct or self.grouped:
            return tuple(pl.ds(t * e, e) for t, e in zip(tile, extents))
        n = math.prod(extents)
        return (pl.ds(tile_flat * n, n),)

    # The grouped layout.

    def group_lengths(self, kind) -> tuple[int, ...]:
        """Per axis, the (static) group length of the local queries or keys (grouped layout)."""
        return tuple((a.q_length if kind == "q" else a.kv_length) // a.dilation for a in self.plan.axes)

    def ragged(self, kind) -> bool:
        """Whether some tile of ``kind`` runs past its group length (grouped layout: masked)."""
        extents, _ = self._tiles(kind)
        return any(n % e for n, e in zip(self.group_lengths(kind), extents))

    def in_group(self, kind, origins, trailing: int):
        """``[*tile_extents, 1 x trailing]`` bool: which rows of the tile whose first token is
        ``origins`` (per axis, group coordinates) lie inside the group (grouped layout; None
        when every tile fits)."""
        if not self.ragged(kind):
            return None
        extents, _ = self._tiles(kind)
        shape = (*extents, *(1,) * trailing)
        inside = None
        for a, (o, e, n) in enumerate(zip(origins, extents, self.group_lengths(kind))):
            if n % e == 0:  # tiles and key-region chunks end inside (`planning._region_chunks`)
                continue
            ok = o + jax.lax.broadcasted_iota(jnp.int32, shape, a) < n
            inside = ok if inside is None else inside & ok
        return inside

    def view(self, x):
        """``[B, *X, ...]`` (``...``: head and channel axes) as the grouped operand
        ``[B, Lg_1, d_1, ..., Lg_n, d_n, ...]`` (a reshape: no copy)."""
        rank = self.plan.rank
        dims = [n for length, a in zip(x.shape[1:1 + rank], self.plan.axes) for n in (length // a.dilation, a.dilation)]
        return x.reshape(x.shape[0], *dims, *x.shape[1 + rank:])

    def unview(self, x):
        """Inverse of `view`: ``[B, Lg_1, d_1, ..., ...]`` -> ``[B, *X, ...]``."""
        rank = self.plan.rank
        spatial = [x.shape[1 + 2 * a] * x.shape[2 + 2 * a] for a in range(rank)]
        return x.reshape(x.shape[0], *spatial, *x.shape[1 + 2 * rank:])


def _load(ref, st: "_Static", kind: str, origins, index: tuple):
    """``ref[index]`` (``index``: the slices of a tile whose first token is ``origins``, per
    axis, then trailing indices); in the grouped layout the rows past the group length read as
    zeros (masked: the tile may run past the array)."""
    lay = st.layout
    if not lay.grouped or not lay.ragged(kind):
        return ref[index]
    trailing = _trailing_dims(ref, index, lay.plan.rank)
    return pltriton.load(ref.at[index], mask=lay.in_group(kind, origins, trailing), other=0)


def _origins(st: "_Static", kind: str, tile):
    """The first token (per axis) of aligned tile ``tile`` (per-axis ids)."""
    extents = st.config.q_tile if kind == "q" else st.config.kv_tile
    return [t * e for t, e in zip(tile, extents)]


def _trailing_dims(ref, index, rank: int) -> int:
    """How many axes a load of ``ref[index]`` has after the ``rank`` tile axes."""
    rest = index[rank:]
    sliced = sum(isinstance(i, slice) for i in rest)
    return sliced + len(ref.shape) - len(index)


def _own(ref, st: "_Static", kind: str, tile):
    """This program's own tile of a tile operand (``[*block, ...]``): the whole block ref, or in
    the grouped layout the tile ``tile`` (per-axis ids) of the whole-map ref, masked."""
    lay = st.layout
    if not lay.grouped:
        return ref[...]
    index = (*lay.slices(kind, tile, None), *(slice(None),) * (len(ref.shape) - lay.plan.rank))
    return _load(ref, st, kind, _origins(st, kind, tile), index)


def _whole_axes(shape) -> tuple:
    """Index entries selecting whole axes of these extents for a store next to the tiles' traced
    int32 starts: ``slice(None)``, or with ``jax_enable_x64`` on ``pl.ds(int32 0, n)`` (a Python
    0 start becomes int64 there, and interpret mode's discharged store, a `dynamic_slice`,
    rejects int32 and int64 starts together). Without x64 the kernels lower as before."""
    if not jax.config.jax_enable_x64:
        return (slice(None),) * len(shape)
    return tuple(pl.ds(jnp.int32(0), n) for n in shape)


def _put(ref, st: "_Static", kind: str, tile, value):
    """Stores this program's own tile ``value`` (``[tile_tokens, ...]``): the block ref, or in
    the grouped layout the rows of tile ``tile`` inside the group."""
    lay = st.layout
    if not lay.grouped:
        ref[...] = value.reshape(ref.shape)
        return
    trailing = len(ref.shape) - lay.plan.rank
    index = (*lay.slices(kind, tile, None), *_whole_axes(ref.shape[lay.plan.rank:]))
    value = value.reshape(*lay.block(kind), *ref.shape[lay.plan.rank:])
    mask = lay.in_group(kind, _origins(st, kind, tile), trailing)
    if mask is None:
        ref[index] = value
    else:
        pltriton.store(ref.at[index], value, mask=mask)


# ----------------------------------------------------------------------------------------------
# Relative positional bias (``rpb``): the table operand, its class blocks, its in-kernel gather
# ----------------------------------------------------------------------------------------------
#
# The forward, dQ, dK/dV and d_rpb kernels read one dense ``[TQ, TK]`` block per tile pair from
# per-class blocks (`jna.backends.triton.bias_blocks`, `_class_bias`); where those would exceed
# their memory budget, and in the tangent kernel, they gather from the table as below.
#
# The kernels take the bias as ``[H, bias_padded]`` float32: head h's table ``rpb[h]``
# (``[2K_1 - 1, ..., 2K_n - 1]``) flattened row-major and zero-padded to a power of two
# (`_bias_table`). A program reads its head's row only. The bias of (query x, key y) is
# ``rpb[h, flat(y' - x' + K - 1)]``; row-major flattening makes that index separable,
#
#     flat = sum_a (y'_a - x'_a + K_a - 1) * stride_a = key_part(y) - query_part(x) + const,
#
# so per tile pair it is one [TQ, TK] subtraction of two vectors, clamped into the table (pairs
# outside every window may fall outside; they are masked like their logits), followed by an
# indexed load from global memory (`_bias`). Why a load from memory rather than a gather from
# registers: Pallas Triton lowers no gather of a value (`jnp.take` on a loaded block), but it
# lowers a load through an integer index array (a tensor of pointers), and a head's table
# (676 B at K = 7 in 2-D, 300 KiB for 3d-hunyuan's K = 18x24x24) stays in L1/L2, where every
# program of the head reads it. The consecutive keys of a tile row have consecutive indices, so
# the loads of a warp coalesce.


def _bias_table(rpb, st: "_Static"):
    """The kernel-layout bias ``[H, bias_padded]`` float32 of the user's ``rpb``
    ``[H, 2K_1 - 1, ..., 2K_n - 1]`` (float32 or q's dtype): differentiable, so the table's
    cotangent flows back to ``rpb`` in its own dtype."""
    table = jnp.asarray(rpb).astype(jnp.float32).reshape(rpb.shape[0], st.bias_size)
    return jnp.pad(table, ((0, 0), (0, st.bias_padded - st.bias_size)))


def _user_bias(table, st: "_Static"):
    """Inverse of `_bias_table` (float32): ``[H, bias_padded]`` -> ``[H, 2K_1 - 1, ...]``."""
    return table[:, : st.bias_size].reshape(table.shape[0], *(2 * a.kernel_size - 1 for a in st.plan.axes))


def _bias_strides(st: "_Static") -> tuple[list[int], int]:
    """Per axis the row-major stride of the flat table, and ``sum_a (K_a - 1) * stride_a``."""
    sizes = [2 * a.kernel_size - 1 for a in st.plan.axes]
    strides = [math.prod(sizes[a + 1:]) for a in range(len(sizes))]
    return strides, sum((a.kernel_size - 1) * s for a, s in zip(st.plan.axes, strides))


def _bias_part(st: "_Static", coords):
    """``sum_a coords[a] * stride_a`` (int32 ``[tokens]``) for per-axis group coordinates of the
    tokens of a tile (queries or keys): one side of the separable flat index."""
    strides, _ = _bias_strides(st)
    part = None
    for c, s in zip(coords, strides):
        term = c * s if s != 1 else c
        part = term if part is None else part + term
    return part


def _bias(rpb_ref, st: "_Static", q_part, k_part, head=None):
    """``[TQ, TK]`` float32 bias of a tile pair from `_bias_part` of its queries and keys:
    ``rpb[h, flat(y' - x' + K - 1)]`` (``head``: the row of a multi-head block, dK/dV's GQA
    group; None: the program's only row). Exact for every pair a window allows; the others read
    a clamped entry and must be masked (they are: every kernel masks their logits)."""
    _, const = _bias_strides(st)
    idx = k_part[None, :] - q_part[:, None] + const
    idx = jnp.minimum(jnp.maximum(idx, 0), st.bias_size - 1)
    return rpb_ref[idx] if head is None else rpb_ref[head, idx]


def _split_pair_bias(st: "_Static", refs):
    """``(bias refs or None, the remaining refs)`` of a kernel that reads the bias through
    `_add_pair_bias`: ``(blocks, lut)`` with `_Static.bias_blocks`, else ``(table,)``."""
    if not st.bias:
        return None, refs
    n = 2 if st.bias_blocks else 1
    return tuple(refs[:n]), refs[n:]


def _class_bias(bias, st: "_Static", qo, ko, head=None):
    """``[TQ, TK]`` float32 bias block of the tile pair whose Q and KV tiles (or chunks) start at
    per-axis tokens ``qo`` and ``ko`` (group coordinates): its class from the per-axis lookup
    tables, then one dense load (`bias_blocks`). ``head``: the row of a multi-head block."""
    blocks_ref, lut_ref = bias
    classes = st.bias_classes
    flat = None
    for a in range(st.plan.rank):
        d = ko[a] - qo[a] - classes.lut_lo[a]
        d = jnp.minimum(jnp.maximum(d, 0), classes.lut_sizes[a] - 1)  # every visited pair is inside
        c = lut_ref[classes.lut_offsets[a] + d]
        flat = c if flat is None else flat + c
    return blocks_ref[flat] if head is None else blocks_ref[head, flat]


def _add_pair_bias(s, bias, st: "_Static", qo, ko, x_part, y_part, head=None):
    """Base-2 logits ``s`` of a tile pair plus its bias; ``s`` unchanged without one. The
    operands (`_bias_inputs`) hold ``b * log2(e)`` already, so a scaled logit and its bias are one
    fused multiply-add. ``qo``/``ko``: the pair's first query and key per axis; ``x_part``/``y_part``:
    callables giving `_bias_part` of its queries and keys (the gather, past the blocks' budget)."""
    if bias is None:
        return s
    if st.bias_blocks:
        b = _class_bias(bias, st, qo, ko, head)
    else:
        b = _bias(bias[0], st, x_part(), y_part(), head)
    return s + b


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


# How a kernel's walk masks its steps (issue 16), from the fraction of the tile pairs it visits
# that need no mask (`TilePlan.full_fraction`): never if every pair is full; on every step if
# fewer than ``MASK_EVERY_STEP_BELOW[kernel]`` are; otherwise behind a branch on each step's
# flag. The flag is a table load and a branch, which cost more than the mask itself where most
# pairs are partial: the forward keeps it from a quarter of full pairs up (H200: 2d-flux, 0.66
# full, 17.25 ms with it vs 17.93; 3d-hunyuan, 0.40, 71.9 vs 76.3; the small windows, under
# 0.05, 5-14% faster without), the backward kernels never do (masking every partial pair was
# faster on every problem measured: 2d-flux 83.3 vs 89.1 ms fwd+bwd, 3d-hunyuan 365 vs 415,
# sweep-2d-k31 1.92 vs 2.01; `benchmarks/results/h200_mask_work_2026-12-02`).
MASK_EVERY_STEP_BELOW = {"forward": 0.25, "dq": 1.0, "dkv": 1.0}


def walk_masking(plan: planning.TilePlan, kind: str, kernel: str) -> str:
    """How ``kernel``'s walk (``kind`` as `_Walk`) masks its steps: ``"never"``, ``"always"`` or
    ``"per-step"`` (`MASK_EVERY_STEP_BELOW`)."""
    fraction = plan.full_fraction(kind)
    if fraction == 1.0:
        return "never"
    return "always" if fraction < MASK_EVERY_STEP_BELOW[kernel] else "per-step"


class _Walk:
    """What one program visits, in tile-shaped steps: a Q tile's keys (``kind="kv"``: forward,
    dQ, tangent) or a KV tile's queries (``kind="q"``: dK/dV). Either the aligned tiles of the
    plan (`TileWalk`), or with the region walk (`TritonConfig.kv_region`) the chunks of the
    exact region from the plan's token origins. ``total``: the number of steps; `visit`: what a
    kernel needs of step ``i``; ``kernel``: which kernel walks (``"forward"``, ``"dq"`` or
    ``"dkv"``: how it masks, `MASK_EVERY_STEP_BELOW`)."""

    def __init__(self, st: _Static, geo: Geometry, tile, kind: str, kernel: str):
        self.st, self.geo, self.tile, self.kind = st, geo, tile, kind
        self.masking = walk_masking(st.plan, kind, kernel)
        self.extents = st.config.kv_tile if kind == "kv" else st.config.q_tile
        if st.plan.region:
            region = geo.kv_region if kind == "kv" else geo.q_region
            regions = [region(a, tile[a]) for a in range(st.plan.rank)]
            self.region_origins = [origin for origin, _ in regions]
            self.walk = TileWalk([(jnp.int32(0), steps) for _, steps in regions], [s for _, s in regions])
        else:
            self.walk = (TileWalk.kv_tiles if kind == "kv" else TileWalk.q_tiles)(geo, tile)
        self.total = self.walk.total

    def visit(self, i):
        """Step ``i``: the visited tokens' first token per axis (local coordinates), the
        in-kernel slices of the visited operands, and whether the pair of this program's tile
        and the step needs no mask (for `_by_full`): True (no step does), None (it may; mask
        it), or a traced int32 flag."""
        st, geo = self.st, self.geo
        steps, flat = self.walk.at(i)
        if st.plan.region:
            origins = [o + j * e for o, j, e in zip(self.region_origins, steps, self.extents)]
            slices = tuple(pl.ds(o, e) for o, e in zip(origins, self.extents))
            flag = lambda: (geo.region_full(self.tile, steps) if self.kind == "kv"
                            else geo.region_q_full(self.tile, steps))
        else:
            origins, slices = _origins(st, self.kind, steps), st.layout.slices(self.kind, steps, flat)
            flag = lambda: geo.full(self.tile, steps) if self.kind == "kv" else geo.full(steps, self.tile)
        if self.masking == "per-step":
            return origins, slices, flag()
        return origins, slices, True if self.masking == "never" else None


def _by_full(full, if_full, if_partial, *args):
    """``if_full(*args)`` where a walk step needs no mask, else ``if_partial(*args)``; ``full``
    from `_Walk.visit` (True, None, or a traced flag: a branch)."""
    if full is True:
        return if_full(*args)
    if full is None:
        return if_partial(*args)
    return jax.lax.cond(full > 0, if_full, if_partial, *args)


def _q_tile_program(st: _Static, tab_ref, kernel: str):
    """Per-program state of a kernel over one Q tile (grid: Q tile, batch*group, head).

    Returns the geometry, this program's per-axis Q tile ids, the tile-local key coordinates of
    a KV step, its queries' per-axis window spans (`Geometry.span`), and the walk over the keys
    to visit (`_Walk`).
    """
    plan, cfg = st.plan, st.config
    geo = Geometry(st.plan, tab_ref, pl.program_id(1))
    qt = unravel(pl.program_id(0), [a.num_q_tiles for a in plan.axes])
    q_local = geo.local_coords(cfg.q_tile)
    k_local = geo.local_coords(cfg.kv_tile)
    spans = [geo.span(a, qt[a] * cfg.q_tile[a] + q_local[a]) for a in range(plan.rank)]
    return geo, qt, k_local, spans, _Walk(st, geo, qt, "kv", kernel)


def _q_bias_part(st: _Static, geo: Geometry, qt):
    """`_bias_part` of the queries of Q tile ``qt`` (per-axis ids; group coordinates)."""
    q_local = geo.local_coords(st.config.q_tile)
    return _bias_part(st, [qt[a] * st.config.q_tile[a] + q_local[a] for a in range(st.plan.rank)])


def _add_bias(s, rpb_ref, st: _Static, q_part, y, head=None):
    """Base-2 logits ``s`` (``q.k * scale * log2(e)``) plus the bias of the pair in the same
    units (the bias is added after scaling, in the natural-log domain: ``b * log2(e)``);
    ``s`` unchanged without a bias. ``y``: the keys' per-axis group coordinates."""
    if rpb_ref is None:
        return s
    return s + _bias(rpb_ref, st, q_part, _bias_part(st, y), head) * _LOG2E


def _leaked(out):
    """Whether a program's output tile ``out`` (float32 ``[TQ, Dv]``) holds a non-finite value."""
    return jnp.max(jnp.where(jnp.abs(out) <= _F32_MAX, _ZERO, _ONE)) > 0


def _forward_kernel(q_ref, k_ref, v_ref, tab_ref, *refs, st: _Static):
    """One program's forward (exact where every value it sums is finite: `_forward_call`).
    ``refs``: the bias operands when the launch has one (`_split_pair_bias`), then out and lse."""
    bias, (o_ref, lse_ref) = _split_pair_bias(st, refs)
    program = _q_tile_program(st, tab_ref, "forward")
    out, lse = _forward_loop(q_ref, k_ref, v_ref, bias, program, st=st, contain=False)
    _put(o_ref, st, "q", program[1], out.astype(o_ref.dtype))
    _put(lse_ref, st, "q", program[1], lse)


def _contained_kernel(q_ref, k_ref, v_ref, tab_ref, *refs, st: _Static):
    """The forward again with non-finite values contained, over the fast kernel's outputs
    (aliased: ``o_in``/``lse_in`` are ``o_ref``/``lse_ref``), in the programs whose fast output
    tile is non-finite (`_forward_call`); the others read their tile and return.
    ``refs``: [bias,] o_in, lse_in, o, lse."""
    bias, (o_in, lse_in, o_ref, lse_ref) = _split_pair_bias(st, refs)
    del lse_in
    program = _q_tile_program(st, tab_ref, "forward")  # outside the branch (interpret mode needs program ids here)
    qt = program[1]

    @pl.when(_leaked(_own(o_in, st, "q", qt).astype(jnp.float32)))
    def _():
        out, lse = _forward_loop(q_ref, k_ref, v_ref, bias, program, st=st, contain=True)
        _put(o_ref, st, "q", qt, out.astype(o_ref.dtype))
        _put(lse_ref, st, "q", qt, lse)


def _forward_loop(q_ref, k_ref, v_ref, bias, program, *, st: _Static, contain: bool):
    """The online-softmax loop of one Q tile: ``(out [TQ, Dv], lse [TQ])`` float32.
    ``contain``: the variant that keeps non-finite values inside the windows that hold them;
    ``bias``: the bias refs (`_split_pair_bias`), or None."""
    plan = st.plan
    f32 = _f32_products(st)
    tq, tk = plan.q_tile_tokens, plan.kv_tile_tokens
    geo, qt, k_local, spans, walk = program
    qk_scale = st.scale * _LOG2E
    qo = [qt[a] * st.config.q_tile[a] for a in range(plan.rank)]
    q_part = None if bias is None or st.bias_blocks else _q_bias_part(st, geo, qt)

    q = _own(q_ref, st, "q", qt).reshape(tq, st.head_dim)

    # Base-2 logits are ``s * c``: without a bias (and with a positive scale, so that
    # ``max(s) * c == max(s * c)`` exactly) the scale is applied to the row max and inside the
    # exponent's argument (one fused multiply-add per logit) instead of to every logit first.
    folded = bias is None and qk_scale > 0
    c = qk_scale if folded else None

    def body(i, carry):
        acc, m, l, poisoned = carry
        ko, tile, full = walk.visit(i)
        k = _load(k_ref, st, "kv", ko, (*tile, slice(None))).reshape(tk, st.head_dim)
        load_v = lambda: _load(v_ref, st, "kv", ko, (*tile, slice(None))).reshape(tk, st.value_dim)
        s = _dot(q, k, trans_b=True, f32=f32)
        y = [ko[a] + k_local[a] for a in range(plan.rank)]
        if not folded:
            s = _add_pair_bias(s * qk_scale, bias, st, qo, ko, lambda: q_part, lambda: _bias_part(st, y))

        if contain:
            # 0 * NaN = NaN: a non-finite value row outside a query's window would leak into its
            # output through P @ V. In partial tiles such rows are zeroed and the queries whose
            # windows do hold one are marked, to be set to NaN at the end. (Routing v through
            # the cond costs Triton its load pipelining, hence a separate kernel variant that
            # runs only in the programs whose fast output tile is non-finite.)
            def partial_tile(s, v):
                allowed = geo.mask(spans, y)
                bad = jnp.max(jnp.where(jnp.abs(v.astype(jnp.float32)) <= _F32_MAX, _ZERO, _ONE), axis=1)
                v = jnp.where(bad[:, None] > 0, jnp.zeros_like(v), v)
                hits = jnp.max(jnp.where(allowed, bad[None, :], 0.0), axis=1)
                return jnp.where(allowed, s, -jnp.inf), v, hits

            def full_tile(s, v):  # every pair allowed: NaNs propagate as they should
                return s, v, jnp.zeros((tq,), jnp.float32)

            s, v, hits = _by_full(full, full_tile, partial_tile, s, load_v())
            poisoned = jnp.maximum(poisoned, hits)
        else:
            s = _by_full(full, lambda s: s, lambda s: jnp.where(geo.mask(spans, y), s, -jnp.inf), s)
        # Masked logits are -inf, so p is exactly 0 there; m starts finite (_MASK_VALUE), so a
        # row with no allowed key yet keeps m finite and alpha = 1.
        row_max = jnp.max(s, axis=1)
        m_new = jnp.maximum(m, row_max * c if folded else row_max)
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2((s * c if folded else s) - m_new[:, None])
        l = alpha * l + jnp.sum(p, axis=1)
        if not contain:
            v = load_v()
        acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v, f32=f32)
        return acc, m_new, l, poisoned

    init = (
        jnp.zeros((tq, st.value_dim), jnp.float32),
        jnp.full((tq,), _MASK_VALUE, jnp.float32),
        jnp.zeros((tq,), jnp.float32),
        jnp.zeros((tq,), jnp.float32),
    )
    acc, m, l, poisoned = jax.lax.fori_loop(0, walk.total, body, init)
    # A row no key was allowed for (a padding query past its group, never stored or read
    # unmasked) has l = 0: out 0 and lse _MASK_VALUE keep it finite. (A NaN l stays NaN.)
    seen = l != 0
    out = acc / jnp.where(seen, l, 1.0)[:, None]
    if contain:
        out = jnp.where(poisoned[:, None] > 0, jnp.nan, out)
    return out, jnp.where(seen, (m + jnp.log2(l)) * _LN2, _MASK_VALUE)


def _masked_probs(geo: Geometry, full, spans, y, s, lse2):
    """Softmax probabilities ``exp2(s - lse)`` of a tile pair, zero where the mask forbids
    (``full``: whether the pair needs no mask, as `_Walk.visit` gives it)."""
    p = jnp.exp2(s - lse2[:, None])
    return _by_full(full, lambda p: p, lambda p: jnp.where(geo.mask(spans, y), p, 0.0), p)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, tab_ref, *refs, st: _Static):
    bias, (dq_ref,) = _split_pair_bias(st, refs)
    plan = st.plan
    f32 = _f32_products(st)
    tq, tk = plan.q_tile_tokens, plan.kv_tile_tokens
    geo, qt, k_local, spans, walk = _q_tile_program(st, tab_ref, "dq")
    qk_scale = st.scale * _LOG2E
    qo = [qt[a] * st.config.q_tile[a] for a in range(plan.rank)]
    q_part = None if bias is None or st.bias_blocks else _q_bias_part(st, geo, qt)

    q = _own(q_ref, st, "q", qt).reshape(tq, st.head_dim)
    do = _own(do_ref, st, "q", qt).reshape(tq, st.value_dim)
    lse2 = _own(lse_ref, st, "q", qt).reshape(tq) * _LOG2E  # base-2 logsumexp
    delta = _own(delta_ref, st, "q", qt).reshape(tq)

    def body(i, dq):
        ko, tile, full = walk.visit(i)
        k = _load(k_ref, st, "kv", ko, (*tile, slice(None))).reshape(tk, st.head_dim)
        v = _load(v_ref, st, "kv", ko, (*tile, slice(None))).reshape(tk, st.value_dim)
        s = _dot(q, k, trans_b=True, f32=f32) * qk_scale
        y = [ko[a] + k_local[a] for a in range(plan.rank)]
        s = _add_pair_bias(s, bias, st, qo, ko, lambda: q_part, lambda: _bias_part(st, y))
        p = _masked_probs(geo, full, spans, y, s, lse2)
        dp = _dot(do, v, trans_b=True, f32=f32)
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, f32=f32)

    dq = jax.lax.fori_loop(0, walk.total, body, jnp.zeros((tq, st.head_dim), jnp.float32))
    _put(dq_ref, st, "q", qt, (dq * st.scale).astype(dq_ref.dtype))


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, tab_ref, *refs, st: _Static):
    bias, (dk_ref, dv_ref) = _split_pair_bias(st, refs)  # bias: the G query heads' rows
    cfg, plan = st.config, st.plan
    f32 = _f32_products(st)
    tq, tk = plan.q_tile_tokens, plan.kv_tile_tokens
    geo = Geometry(st.plan, tab_ref, pl.program_id(1))
    kt = unravel(pl.program_id(0), [a.num_kv_tiles for a in plan.axes])
    q_local = geo.local_coords(cfg.q_tile)
    k_local = geo.local_coords(cfg.kv_tile)
    y = [kt[a] * cfg.kv_tile[a] + k_local[a] for a in range(plan.rank)]
    walk = _Walk(st, geo, kt, "q", "dkv")
    qk_scale = st.scale * _LOG2E
    ko = [kt[a] * cfg.kv_tile[a] for a in range(plan.rank)]
    k_part = None if bias is None or st.bias_blocks else _bias_part(st, y)

    k = _own(k_ref, st, "kv", kt).reshape(tk, st.head_dim)
    v = _own(v_ref, st, "kv", kt).reshape(tk, st.value_dim)

    def q_tile_body(i, carry, head):
        dk, dv = carry
        qo, tile, full = walk.visit(i)
        q = _load(q_ref, st, "q", qo, (*tile, head, slice(None))).reshape(tq, st.head_dim)
        do = _load(do_ref, st, "q", qo, (*tile, head, slice(None))).reshape(tq, st.value_dim)
        lse2 = _load(lse_ref, st, "q", qo, (*tile, head)).reshape(tq) * _LOG2E
        delta = _load(delta_ref, st, "q", qo, (*tile, head)).reshape(tq)
        s = _dot(q, k, trans_b=True, f32=f32) * qk_scale
        spans = [geo.span(a, qo[a] + q_local[a]) for a in range(plan.rank)]
        if bias is not None:  # (after the spans: without a bias the kernel lowers as before)
            x = [qo[a] + q_local[a] for a in range(plan.rank)]
            s = _add_pair_bias(s, bias, st, qo, ko, lambda: _bias_part(st, x), lambda: k_part, head)
        p = _masked_probs(geo, full, spans, y, s, lse2)
        dv = dv + _dot(p.astype(do.dtype), do, trans_a=True, f32=f32)
        dp = _dot(do, v, trans_b=True, f32=f32)
        ds = p * (dp - delta[:, None])
        dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True, f32=f32)
        return dk, dv

    def head_body(head, carry):
        head = as_int32(head)  # static bounds: an int64 counter under jax_enable_x64
        return jax.lax.fori_loop(0, walk.total, functools.partial(q_tile_body, head=head), carry)

    init = (
        jnp.zeros((tk, st.head_dim), jnp.float32),
        jnp.zeros((tk, st.value_dim), jnp.float32),
    )
    dk, dv = jax.lax.fori_loop(0, st.group, head_body, init)
    _put(dk_ref, st, "kv", kt, (dk * st.scale).astype(dk_ref.dtype))
    _put(dv_ref, st, "kv", kt, dv.astype(dv_ref.dtype))


# ----------------------------------------------------------------------------------------------
# Launches
# ----------------------------------------------------------------------------------------------


def _tables(st: _Static):
    """The plan tables as a kernel operand (int32, padded to a power of two)."""
    tables = st.plan.tables
    padded = np.zeros(pl.next_power_of_2(max(len(tables), 16)), np.int32)
    padded[: len(tables)] = tables
    return jnp.asarray(padded)


def _params(st: _Static, backward: bool):
    cfg = st.config
    if backward:
        return pltriton.CompilerParams(num_warps=cfg.bwd_num_warps, num_stages=cfg.bwd_num_stages)
    return pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


class _Specs:
    """BlockSpecs of the kernel operands for a layout (grid: (tile, batch*group, head))."""

    def __init__(self, st: _Static):
        self.st, self.lay, self.group = st, st.layout, st.group

    def _grouped(self, kind, head_block, trailing, head_of, batch=None):
        """The grouped layout's spec of every operand: the whole dilation group of one batch
        entry and head(s), ``[B, Lg_1, d_1, ..., H, ...]`` -> ``[Lg_1, ..., (heads), ...]``
        (the kernels index their tiles themselves: `_own`, `_load`, `_put`); ``batch``: that
        many consecutive batch entries (a leading block axis), grid batch ``bg`` -> entries
        ``(bg // G) * batch ...`` of group ``bg % G``."""
        plan = self.lay.plan
        block = tuple(x for n in self.lay.group_lengths(kind) for x in (n, None))
        radices = [a.dilation for a in plan.axes]

        def index(t, bg, h):
            g = unravel(bg % plan.num_groups, radices)
            return (bg // plan.num_groups, *(i for ga in g for i in (0, ga)), head_of(h),
                    *(0,) * len(trailing))

        return pl.BlockSpec((batch, *block, head_block, *trailing), index)

    def tile(self, kind, *trailing, head="h"):
        """One tile of a ``[BG, *tokens, H, ...]`` operand (head squeezed unless ``head=None``)."""
        lay = self.lay
        if lay.grouped:
            return self._grouped(kind, None, trailing, lambda h: h)
        heads = (None,) if head else ()

        def index(t, b, h):
            return (b, *lay.index(kind, t), *((h,) if head else ()), *(0,) * len(trailing))

        return pl.BlockSpec((None, *lay.block(kind), *heads, *trailing), index)

    def whole(self, kind, heads, *trailing, batch=None):
        """All tokens of an operand; ``heads`` None (squeezed: kv head ``h // G``) or a count;
        ``batch``: None (one grid batch entry, squeezed) or a count of consecutive entries
        (`_grouped` for the grouped layout)."""
        lay, group = self.lay, self.group
        if lay.grouped:
            return self._grouped(kind, heads, trailing, lambda h: h // group if heads is None else h, batch)
        head_block = (None,) if heads is None else (heads,)

        def index(t, b, h):
            head = h // group if heads is None else h
            return (b, *lay.zeros(kind), head, *(0,) * len(trailing))

        return pl.BlockSpec((batch, *lay.token_shape(kind), *head_block, *trailing), index)

    @staticmethod
    def table(tables):
        return pl.BlockSpec(tables.shape, lambda t, b, h: (0,))

    def bias(self, rows: int | None = None):
        """The bias table ``[H, bias_padded]``: the grid head's row (``rows`` None, squeezed),
        or ``rows`` consecutive rows, block ``h`` (dK/dV: the query heads of kv head h)."""
        padded = self.st.bias_padded
        return pl.BlockSpec((rows, padded), lambda t, b, h: (h, 0))


def _grid_batch(qp, st: _Static) -> int:
    """The grid's batch axis: batch entries times dilation groups (the permuted and direct
    layouts have them in the operands' leading axis already; the grouped one has ``B``)."""
    return qp.shape[0] * st.plan.num_groups if st.layout.grouped else qp.shape[0]


def _forward_call(qp, kp, vp, st: _Static, rpb=None):
    """The forward: the fast kernel, then the containing kernel over its outputs.

    The fast kernel's ``P V`` sums ``0 * v`` over masked keys, so a non-finite value would leak
    into queries that never see it. But a leak leaves its trace: ``0 * v`` is NaN for an
    infinite or NaN ``v``, and the online softmax keeps a non-finite row non-finite to the end,
    so a program whose summed K/V tiles held a non-finite value has a non-finite output tile.
    The second kernel's programs read their fast output tile and only where it is non-finite
    run the loop again with non-finite values contained (`_forward_loop`'s ``contain``). No
    check of ``v`` in XLA (a reduction over it and a flag: 7-11 us a call on the small problems,
    H200) and no host round trip (a `lax.cond`'s predicate); the inline alternative (one
    kernel, the containing loop behind a branch on its own output) measured slower on every
    problem past the NAT/DiNAT layers (sweep-3d-k7 0.396 vs 0.305 ms, H200,
    ``benchmarks/results/h200_mask_work_2026-12-02``). ``rpb``: the bias table (`_bias_table`) when
    ``st.bias``; a non-finite bias needs no containing (it enters only the logits of the pairs
    that use it, and masked logits are replaced, not multiplied)."""
    bias = _bias_inputs(rpb, st)
    out, lse = _forward_launch(qp, kp, vp, st, bias=bias)
    return _forward_launch(qp, kp, vp, st, (out, lse), bias=bias)


def _bias_operands(st: _Static, rpb, spec: "_Specs", rows=None):
    """``(in_specs, operands)`` of the bias table: empty without one (`_Static.bias`); for the
    kernels that gather from it (the tangent's)."""
    if st.bias != (rpb is not None):
        raise ValueError(f"launch planned with bias={st.bias} but given rpb={rpb is not None}")
    return ([spec.bias(rows)], [rpb]) if st.bias else ([], [])


def _bias_inputs(table, st: _Static) -> tuple:
    """The operands `_add_pair_bias` reads, from the kernel-layout table (`_bias_table`), in
    base-2 units (``b * log2(e)``, the factor every kernel would otherwise apply per logit):
    ``(blocks [H, C, TQ, TK] float32, lut)`` with `_Static.bias_blocks`, else ``(table,)``;
    ``()`` without a bias. Build once per call and hand to every launch."""
    if st.bias != (table is not None):
        raise ValueError(f"launch planned with bias={st.bias} but given rpb={table is not None}")
    if table is None:
        return ()
    table = table * _LOG2E
    if not st.bias_blocks:
        return (table,)
    classes = st.bias_classes
    return (bias_blocks.blocks(table, classes, [a.kernel_size for a in st.plan.axes]),
            bias_blocks.lut_operand(classes))


def _pair_bias_operands(st: _Static, bias: tuple, spec: "_Specs", rows=None):
    """``(in_specs, operands)`` of `_bias_inputs`' operands (``rows``: as `_Specs.bias`)."""
    if not bias:
        return [], []
    if not st.bias_blocks:
        return [spec.bias(rows)], list(bias)
    blocks, lut = bias
    block_spec = pl.BlockSpec((rows, *blocks.shape[1:]), lambda t, b, h: (h, 0, 0, 0))
    return [block_spec, pl.BlockSpec(lut.shape, lambda t, b, h: (0,))], list(bias)


def _forward_launch(qp, kp, vp, st: _Static, fast_outputs=None, bias=()):
    """The fast forward kernel; with ``fast_outputs``, the containing one."""
    plan, lay = st.plan, st.layout
    bg = _grid_batch(qp, st)
    tables = _tables(st)
    spec = _Specs(st)
    q_shape = qp.shape[:-1] if lay.grouped else (bg, *lay.token_shape("q"), st.heads)
    contained = fast_outputs is not None
    kernel = _contained_kernel if contained else _forward_kernel
    outs = [spec.tile("q", st.value_dim), spec.tile("q")]
    bias_specs, bias = _pair_bias_operands(st, bias, spec)
    first_out = 4 + len(bias)  # operand index of the aliased fast outputs
    return pl.pallas_call(
        functools.partial(kernel, st=st),
        grid=(plan.num_q_tiles, bg, st.heads),
        in_specs=[
            spec.tile("q", st.head_dim),
            spec.whole("kv", None, st.head_dim),
            spec.whole("kv", None, st.value_dim),
            spec.table(tables),
            *bias_specs,
            *(outs if contained else []),
        ],
        out_specs=outs,
        out_shape=[
            jax.ShapeDtypeStruct((*q_shape, st.value_dim), qp.dtype),
            jax.ShapeDtypeStruct(q_shape, jnp.float32),
        ],
        input_output_aliases={first_out: 0, first_out + 1: 1} if contained else {},
        compiler_params=_params(st, backward=False),
        interpret=st.interpret,
        name="jna_fused_na_fwd_contained" if contained else "jna_fused_na_fwd",
    )(qp, kp, vp, tables, *bias, *(fast_outputs or ()))


def _dq_call(qp, kp, vp, dop, lse, delta, st: _Static, bias=()):
    tables = _tables(st)
    spec = _Specs(st)
    bias_specs, bias = _pair_bias_operands(st, bias, spec)
    return pl.pallas_call(
        functools.partial(_dq_kernel, st=st),
        grid=(st.plan.num_q_tiles, _grid_batch(qp, st), st.heads),
        in_specs=[
            spec.tile("q", st.head_dim),
            spec.whole("kv", None, st.head_dim),
            spec.whole("kv", None, st.value_dim),
            spec.tile("q", st.value_dim),
            spec.tile("q"),
            spec.tile("q"),
            spec.table(tables),
            *bias_specs,
        ],
        out_specs=spec.tile("q", st.head_dim),
        out_shape=jax.ShapeDtypeStruct(qp.shape, qp.dtype),
        compiler_params=_params(st, backward=True),
        interpret=st.interpret,
        name="jna_fused_na_dq",
    )(qp, kp, vp, dop, lse, delta, tables, *bias)


def _dkv_call(qp, kp, vp, dop, lse, delta, st: _Static, bias=()):
    tables = _tables(st)
    spec = _Specs(st)
    group = st.group
    bias_specs, bias = _pair_bias_operands(st, bias, spec, rows=group)

    def whole_q(*trailing):  # all query tokens of the G query heads of kv head h
        lay = st.layout
        if lay.grouped:
            return spec._grouped("q", group, trailing, lambda h: h)
        return pl.BlockSpec((None, *lay.token_shape("q"), group, *trailing),
                            lambda t, b, h: (b, *lay.zeros("q"), h, *(0,) * len(trailing)))

    return pl.pallas_call(
        functools.partial(_dkv_kernel, st=st),
        grid=(st.plan.num_kv_tiles, _grid_batch(qp, st), st.kv_heads),
        in_specs=[
            whole_q(st.head_dim),
            spec.tile("kv", st.head_dim),
            spec.tile("kv", st.value_dim),
            whole_q(st.value_dim),
            whole_q(),
            whole_q(),
            spec.table(tables),
            *bias_specs,
        ],
        out_specs=[spec.tile("kv", st.head_dim), spec.tile("kv", st.value_dim)],
        out_shape=[jax.ShapeDtypeStruct(kp.shape, kp.dtype), jax.ShapeDtypeStruct(vp.shape, vp.dtype)],
        compiler_params=_params(st, backward=True),
        interpret=st.interpret,
        name="jna_fused_na_dkv",
    )(qp, kp, vp, dop, lse, delta, tables, *bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused(qp, kp, vp, st: _Static):
    """Fused NA on kernel-layout tensors: ``(out [BG, *tokens, H, Dv'], lse [BG, *tokens, H])``."""
    return tuple(_forward_call(qp, kp, vp, st))


def _fused_fwd(qp, kp, vp, st):
    out, lse = _forward_call(qp, kp, vp, st)
    return (out, lse), (qp, kp, vp, out, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_rpb(qp, kp, vp, rpb, st: _Static):
    """`_fused` with a relative positional bias ``rpb`` (`_bias_table`: ``[H, bias_padded]``
    float32), differentiable in it too."""
    return tuple(_forward_call(qp, kp, vp, st, rpb))


def _fused_rpb_fwd(qp, kp, vp, rpb, st):
    out, lse = _forward_call(qp, kp, vp, st, rpb)
    return (out, lse), (qp, kp, vp, rpb, out, lse)


def _fused_bwd(st, residuals, cotangents):
    """``(dq, dk, dv)``, or with a bias (residuals ``(q, k, v, rpb, out, lse)``) ``(dq, dk, dv,
    d_rpb)``: d_rpb from `jna.backends.triton.bias_grad` (deterministic, no atomics)."""
    *inputs, out, lse = residuals
    qp, kp, vp = inputs[:3]
    rpb = inputs[3] if len(inputs) == 4 else None
    dout, dlse = cotangents
    # d lse_i / d s_ij = P_ij, so an lse cotangent enters as a shift of delta.
    delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1) - dlse
    dout = dout.astype(qp.dtype)
    bias = _bias_inputs(rpb, st)
    dq = _dq_call(qp, kp, vp, dout, lse, delta, st, bias)
    dk, dv = _dkv_call(qp, kp, vp, dout, lse, delta, st, bias)
    if rpb is None:
        return dq, dk, dv
    from jna.backends.triton import bias_grad

    return dq, dk, dv, bias_grad.bias_gradient(qp, kp, vp, dout, lse, delta, bias, st)


_fused.defvjp(_fused_fwd, _fused_bwd)
_fused_rpb.defvjp(_fused_rpb_fwd, _fused_bwd)


# ----------------------------------------------------------------------------------------------
# Forward mode (`jna._src.forward_mode`): the tangent kernel, reverse mode by the kernels above
# ----------------------------------------------------------------------------------------------


def _second_order(st: _Static, qp, kp, vp, tq, tk, tv, dq, dk, dv, rpb=None, trpb=None, drpb=None):
    """The derivative of the tangent in (q, k, v) along (dq, dk, dv), in kernel layout: the
    reference backend's attention differentiated twice (float32, on the user layout). With a
    bias: ``rpb``, its tangent ``trpb`` and direction ``drpb`` (kernel-layout tables
    ``[H, bias_padded]``), the derivative in (q, k, v, rpb)."""
    from jna.backends import reference

    problem = dataclasses.replace(st.problem, dtype=jnp.dtype(jnp.float32))
    plan = st.plan
    dims = {"q": problem.head_dim, "k": problem.head_dim, "v": problem.value_dim}

    def user(x, name):
        x = x.astype(jnp.float32)
        if st.layout.direct:
            return x
        if st.layout.grouped:
            return st.layout.unview(x)
        kind = "q" if name == "q" else "kv"
        return planning.unpermute(x, plan, kind, plan.local_shape(kind), dims[name])

    names = ("q", "k", "v")
    primals = tuple(user(x, n) for x, n in zip((qp, kp, vp), names))
    first_dir = tuple(user(x, n) for x, n in zip((tq, tk, tv), names))
    second_dir = tuple(user(x, n) for x, n in zip((dq, dk, dv), names))
    if rpb is not None:  # the bias as a fourth input, in the user's layout
        bias = lambda t: _user_bias(t.astype(jnp.float32), st)
        primals, first_dir, second_dir = ((*x, bias(b)) for x, b in
                                          ((primals, rpb), (first_dir, trpb), (second_dir, drpb)))
    if plan.has_spans:  # query offsets: the reference's windowed form, same global windows
        if rpb is not None:
            raise NotImplementedError("fused-triton: rpb with query offsets (spans)")
        coords = [a.q_origin * a.dilation + jnp.arange(a.q_length, dtype=jnp.int32) for a in plan.axes]
        offsets = [a.kv_origin * a.dilation for a in plan.axes]
        na = lambda q, k, v: reference.attention_window(q, k, v, problem, coords, offsets)
    else:
        na = lambda q, k, v, *b: reference.attention(q, k, v, problem, *b)

    def first(*qkv):
        return jax.jvp(na, qkv, first_dir)[1]

    _, (d_out, d_lse) = jax.jvp(first, primals, second_dir)
    if st.layout.direct:
        return d_out, d_lse
    if st.layout.grouped:
        return st.layout.view(d_out), st.layout.view(d_lse)
    d_out = planning.permute(d_out, plan, "q", st.value_dim)
    d_lse = planning.permute(d_lse[..., None], plan, "q")[..., 0]
    return d_out, d_lse


def _second_order_rule(st, *args):
    """`_second_order` on forward mode's operands: ``(q, k, v, tq, tk, tv, dq, dk, dv)``, or with
    the bias ``(q, k, v, rpb, tq, tk, tv, trpb, dq, dk, dv, drpb)``."""
    if len(args) == 9:
        return _second_order(st, *args)
    q, k, v, rpb, tq, tk, tv, trpb, dq, dk, dv, drpb = args
    return _second_order(st, q, k, v, tq, tk, tv, dq, dk, dv, rpb=rpb, trpb=trpb, drpb=drpb)


def _tangent_rule(st, *args):
    """The tangent kernel on ``(q, k, v, out, lse, tq, tk, tv)``, or with the bias ``(q, k, v,
    rpb, out, lse, tq, tk, tv, trpb)``."""
    from jna.backends.triton import tangent

    if len(args) == 8:
        return tangent.tangent_call(*args, st)
    q, k, v, rpb, out, lse, tq, tk, tv, trpb = args
    return tangent.tangent_call(q, k, v, out, lse, tq, tk, tv, st, rpb=rpb, trpb=trpb)


forward_mode.register(NAME, forward_mode.Rules(
    tangent=_tangent_rule, backward=_fused_bwd, second_order=_second_order_rule))
_op = forward_mode.fused_op(NAME, _fused)
_op_rpb = forward_mode.fused_op(NAME, _fused_rpb)  # op(st, q, k, v, rpb table)


def _padded_dim(dim: int) -> int:
    return max(16, pl.next_power_of_2(dim))


# Above this many query elements (B * H * N * D), rank >= 2 problems take the permuted layout:
# reading [*tile, D] blocks in place and flattening them costs the kernel more than the
# permutation copies (H100: 2d-flux 20.3 ms direct vs 16.9 ms permuted), while on small maps the
# copies dominate (2d-nat: 0.153 ms direct vs 0.193 ms permuted). 1-D tiles are contiguous
# either way, so rank 1 always reads in place.
_DIRECT_MAX_ELEMENTS = 2**24


def _direct_ok(problem: NAProblem, plan: planning.TilePlan, head_dim: int, value_dim: int,
               config_allows: bool = True) -> bool:
    """Whether the kernels read tiles straight from ``[B, *X, H, D]`` (no permutation)."""
    elements = problem.batch * problem.heads * problem.params.num_tokens * problem.head_dim
    return (
        config_allows
        and (problem.rank == 1 or elements <= _DIRECT_MAX_ELEMENTS)
        and head_dim == problem.head_dim
        and value_dim == problem.value_dim
        and all(
            a.dilation == 1 and a.q_length % a.q_tile == 0 and a.kv_length % a.kv_tile == 0
            for a in plan.axes
        )
    )


def _grouped_ok(problem: NAProblem, plan: planning.TilePlan, head_dim: int, value_dim: int,
                config_allows: bool = True) -> bool:
    """Whether the kernels index dilation groups in place (`_Layout`'s grouped layout) where the
    direct layout does not apply: every axis a multiple of its dilation (a reshape makes the
    groups strided sub-arrays), head dims powers of two, no query offsets, and the same size
    limit as the direct layout (large maps read permuted tiles faster)."""
    elements = problem.batch * problem.heads * problem.params.num_tokens * problem.head_dim
    return (
        config_allows
        and not plan.has_spans
        and (problem.rank == 1 or elements <= _DIRECT_MAX_ELEMENTS)
        and head_dim == problem.head_dim
        and value_dim == problem.value_dim
        and all(a.length % a.dilation == 0 for a in plan.axes)
    )


def _in_place(problem: NAProblem, plan: planning.TilePlan, config: TritonConfig) -> tuple[bool, bool]:
    """``(direct, grouped)``: which in-place layout the kernels take for this call, if any."""
    head_dim, value_dim = _padded_dim(problem.head_dim), _padded_dim(problem.value_dim)
    direct = _direct_ok(problem, plan, head_dim, value_dim, config.direct_layout)
    grouped = not direct and _grouped_ok(problem, plan, head_dim, value_dim, config.direct_layout)
    return direct, grouped


def region_applies(problem: NAProblem, config: TritonConfig) -> bool:
    """Whether ``config`` runs the key-region walk on ``problem`` (it asks for it and the tiles
    are read in place; whole problems, no query offsets)."""
    if not config.kv_region:
        return False
    plan = planning.make_plan(problem.params, config.q_tile, config.kv_tile)
    return any(_in_place(problem, plan, config))


def attention(q, k, v, problem: NAProblem, config: TritonConfig | None = None,
              spans: tuple[planning.AxisSpan | None, ...] | None = None, rpb=None):
    """Fused neighborhood attention (differentiable in q, k, v, rpb and through both outputs).

    Args:
      q: ``[B, *X, H, D]``; k: ``[B, *X, H_kv, D]``; v: ``[B, *X, H_kv, D_v]``.
      problem: the validated call (`jna._src.arguments.check_call`).
      config: tile config; default `default_config(problem)`.
      spans: query offsets (spatial sharding): per axis None (the whole axis) or a
        `jna._src.plan.AxisSpan` saying which global rows the local queries and keys are. Then
        ``X`` above is the local queries' shape for q and the local keys' for k and v, and the
        windows are ``problem``'s (global); every window must lie in the local keys.
      rpb: None or a relative positional bias ``[H, 2K_1 - 1, ..., 2K_n - 1]`` (float32 or q's
        dtype; non-causal, stride 1: `jna._src.arguments.check_rpb`), added in float32 after
        scaling to the logit of (query x, key y) at ``(y' - x') + K - 1`` per axis (group
        coordinates), inside every kernel (forward, dQ, dK/dV, tangent); its gradient comes from
        a deterministic kernel (`jna.backends.triton.bias_grad`). Every layout and walk takes it;
        query offsets (``spans``) do not (NotImplementedError).

    Returns:
      ``(out, lse)``: ``[B, *X, H, D_v]`` in q's dtype and ``[B, *X, H]`` float32 (lse with the
      bias).
    """
    config = config or default_config(problem)
    for name in ("q_tile", "kv_tile"):
        # Triton's dot needs >= 16 rows and columns: on an H200, 4-token 1-D tiles returned
        # exactly twice the output (lse right, P @ V doubled), silently. The backend fits explicit
        # configs up to this (`tiling.fit_config`); direct callers get an error, on every device.
        tokens = math.prod(getattr(config, name))
        if tokens < MIN_TILE_TOKENS:
            raise ValueError(f"fused-triton: config.{name} = {getattr(config, name)} holds {tokens} tokens; "
                             f"a tile needs >= {MIN_TILE_TOKENS} (Triton's dot), e.g. "
                             f"`jna.backends.tiling.fit_config(config, params, {MIN_TILE_TOKENS})`")
    if rpb is not None:
        rpb = jnp.asarray(rpb)
        if spans is not None and any(sp is not None for sp in spans):
            raise NotImplementedError("fused-triton: rpb (relative positional bias) with query offsets "
                                      "(spans, spatial sharding) is not implemented")
        # check_rpb's rules, for callers that bypass the public API (the kernels rely on them)
        params = problem.params
        want = (problem.heads, *(2 * kk - 1 for kk in params.kernel_size))
        if any(params.is_causal) or any(s_ != 1 for s_ in params.stride) or tuple(rpb.shape) != want:
            raise ValueError(f"fused-triton: rpb of shape {tuple(rpb.shape)} needs shape {want}, "
                             f"stride 1 and no causal axis (got stride={params.stride}, "
                             f"is_causal={params.is_causal})")
    plan = planning.make_plan(problem.params, config.q_tile, config.kv_tile, spans)
    for kind, x in (("q", q), ("kv", k), ("kv", v)):
        if tuple(x.shape[1:-2]) != plan.local_shape(kind):
            raise ValueError(f"fused-triton: {kind} spatial shape {tuple(x.shape[1:-2])} does not match "
                             f"{plan.local_shape(kind)} (the problem's, or its spans')")
    head_dim, value_dim = _padded_dim(problem.head_dim), _padded_dim(problem.value_dim)
    direct, grouped = _in_place(problem, plan, config)
    if config.kv_region and (direct or grouped):  # keys read in place at any token offset
        plan = planning.make_plan(problem.params, config.q_tile, config.kv_tile, spans, region=True)
    st = _Static(
        plan=plan,
        heads=problem.heads,
        kv_heads=problem.kv_heads,
        head_dim=head_dim,
        value_dim=value_dim,
        scale=problem.scale,
        dtype=jnp.dtype(problem.dtype),
        config=config,
        interpret=_interpret(),
        layout=_Layout(direct, plan, grouped),
        problem=problem,
        bias=rpb is not None,
    )
    if rpb is None:
        op = _op
    else:
        table = _bias_table(rpb, st)
        op = lambda st, *qkv: _op_rpb(st, *qkv, table)
    if direct:
        q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
        return op(st, q, k, v)
    if grouped:
        out, lse = op(st, *(st.layout.view(jnp.asarray(x)) for x in (q, k, v)))
        return st.layout.unview(out), st.layout.unview(lse)
    qp = planning.permute(q, plan, "q", st.head_dim)
    kp = planning.permute(k, plan, "kv", st.head_dim)
    vp = planning.permute(v, plan, "kv", st.value_dim)
    out, lse = op(st, qp, kp, vp)
    spatial = plan.local_shape("q")
    out = planning.unpermute(out, plan, "q", spatial, problem.value_dim)
    lse = planning.unpermute(lse, plan, "q", spatial)
    return out, lse


# ----------------------------------------------------------------------------------------------
# The backend (the contract of `jna.backends.base`)
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FusedTriton(TritonBackend):
    """fused-triton: flash-style fused NA in Pallas Triton (NVIDIA sm80+; interpret mode on CPU).

    ``FusedTriton()`` picks its config per call (`default_config`); ``FusedTriton(TritonConfig(...))``
    runs that config, tiles fitted to each call.
    """

    config: TritonConfig | None = None

    name: ClassVar[str] = NAME
    config_type: ClassVar[type] = TritonConfig
    launch_config_file: ClassVar[str] = "fused_triton.json"
    supports_rpb: ClassVar[bool] = True  # in every kernel and layout (`attention`)
    launch_classes = staticmethod(launch_classes)
    default_config = staticmethod(default_config)
    default_config_source = staticmethod(config_source)

    def candidate_configs(self, problem: NAProblem, shapes_per_class: int = 2) -> list:
        """Every launch class of the problem's head-dim bucket, each with its
        ``shapes_per_class`` most tile-efficient per-axis shapes; where the kernels read tiles
        in place, also each class's most efficient shapes under the key-region walk
        (``kv_region=True``: efficiency of that walk)."""
        out = []
        for c in launch.for_head_dim(launch_classes(), problem.head_dim):
            for eff, q_tile, kv_tile in ranked_tiles(problem.params, c.q_tokens, c.kv_tokens,
                                                     shapes_per_class):
                out.append((c.fields, _config(c, q_tile, kv_tile), eff))
                if region_applies(problem, out[-1][1]):
                    break  # the region candidates follow; one aligned shape per class is enough
            for eff, q_tile, kv_tile in ranked_tiles(problem.params, c.q_tokens, c.kv_tokens,
                                                     shapes_per_class, region=True):
                config = dataclasses.replace(_config(c, q_tile, kv_tile), kv_region=True)
                if region_applies(problem, config):
                    out.append((c.fields, config, eff))
        return out

    def attention(self, q, k, v, problem: NAProblem, spans=None, rpb=None):
        """``spans``: query offsets (`attention`), for spatial sharding's offset route; ``rpb``:
        the relative positional bias (`attention`)."""
        return attention(q, k, v, problem, self.config_for(problem), spans, rpb=rpb)
