"""Neighborhood attention over many devices: batch/head parallel, spatial halo exchange, Ulysses.

A Pallas call is opaque to XLA's SPMD partitioner, so jna runs its kernels per shard inside
`jax.shard_map` and says explicitly what moves between devices:

* **batch and head sharding** (mesh axes ``batch_axis`` / ``head_axis``): every shard runs the
  chosen backend on its own batch entries / heads; no communication at all. With GQA the query
  heads and the kv heads are split into the same number of contiguous blocks, which keeps the
  ``h -> h // (H // H_kv)`` mapping inside each block.
* **spatial (context) sharding** along one spatial axis (``spatial_dim``, the first by default)
  over mesh axis ``spatial_axis``: shard ``i`` owns query and key rows ``[i*n, (i+1)*n)`` of that
  axis (``n = L / P`` for ``P`` shards). Two strategies:

  - the **halo** routes (``"offset"``, ``"slab"``): the shard receives a *halo* of keys and values
    from its neighbors (`jax.lax.ppermute`, K and V packed into one message per direction) exactly
    as wide as the windows of its queries need (`halo`), then computes NA for its own queries over
    the extended key slab with *global* coordinates, so windows shift at the global border only,
    never at a shard border. Autodiff transposes the ppermutes: the backward pass sends the halo
    gradients back to their owners.
  - **Ulysses** (``"ulysses"``, all-to-all; DeepSpeed-Ulysses' layout switch): one
    `jax.lax.all_to_all` per tensor turns the spatial sharding of q, k, v (each shard: all heads,
    ``n`` rows) into head sharding (each shard: the whole grid, heads block ``i`` of ``P``); the
    shard runs the backend's ordinary, unsharded NA call on the whole grid with its heads, and two
    more all_to_alls (out, lse) turn the result back into the spatial layout. Every shard sees the
    whole grid, so this is exact for every window configuration and backend, and it has no limit
    on the window size (the halo routes need shards at least as wide as the halo). It needs the
    query heads *and* the kv heads of a shard (after ``head_axis``) to be divisible by ``P`` (the
    kv heads are split in the same contiguous blocks as the query heads, which keeps GQA's
    mapping inside a block). Autodiff transposes each all_to_all into the reverse all_to_all.

How a shard computes its queries (``method``):

* ``"offset"``: the backend takes a query offset into a larger key extent and computes only the
  shard's own queries. Backends with it: ``reference`` (`jna.backends.reference.attention_window`,
  traced offsets) and ``fused-triton`` (tile plans with static query and key origins per shard,
  `jna._src.plan.AxisSpan`; every shard's plan is traced and `lax.switch` picks the device's; it
  needs shards of a multiple of the dilation, and widens the left halo to one). This is exact
  for every window configuration.
* ``"slab"``: for backends without offsets (e.g. ``fused-mosaic``), the shard runs an ordinary NA
  problem on a slab of ``S >= n`` rows chosen (host side, `slab_plan`) so that every *own*
  query's slab-local window equals its global window, and keeps its ``n`` rows; the other
  ``S - n`` rows are wasted work (reported as ``SlabPlan.waste``). Exactness is verified on the
  host for every shard against `jna.semantics` before anything runs; if no such slab exists
  (e.g. the slab start cannot be aligned to ``stride * dilation``) the call raises
  NotImplementedError naming the reason.
* ``"ulysses"``: the all-to-all strategy above, with any backend.
* ``"auto"``: the halo route of the backend (``offset`` when it has it, else ``slab``) or
  ``ulysses``, by the byte model `route_bytes` (bytes one shard sends in the forward pass):
  ``ulysses`` only when its head counts divide by ``P`` **and** it moves fewer bytes than the halo
  exchange, or when no halo route can run the call at all (shards smaller than the halo, or a
  backend with neither an offset nor an exact slab). The model counts bytes only, not compute:
  the slab route's wasted rows are not in it (pass ``method="ulysses"`` explicitly for backends
  without offsets when heads divide; docs/sharding.md has the numbers).

An explicitly named backend never falls back: if no route can run the call, that is an error.
``backend="auto"`` resolves as in `jna.neighborhood_attention`; under spatial sharding, if the
resolved backend can run neither halo route and Ulysses does not apply, it falls back to
``reference`` with a warning.

The result equals the single-device result (to float32 rounding for the offset and Ulysses
routes; the slab route runs the same backend on a different tiling, so it matches to that
backend's tolerance).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jna import backends, semantics
from jna._src.arguments import check_call
from jna.backends import reference
from jna._src.dense import dense_attention
from jna.merge import merge_attentions

__all__ = [
    "Halo",
    "SlabPlan",
    "halo",
    "slab_plan",
    "route_bytes",
    "spatial_route",
    "partition_spec",
    "neighborhood_attention",
    "na1d",
    "na2d",
    "na3d",
    "OFFSET_BACKENDS",
    "METHODS",
]

def _fused_triton_offset_route(params: semantics.NAParams, h: "Halo") -> str | None:
    """Why fused-triton cannot take the offset route for this sharding, or None.

    Its plans need the key slab to start on a multiple of the dilation (a local row keeps its
    global dilation group), so the shard size must be one and the left halo is widened to one
    (`_offset_halo`); the widened halo must still come from the immediate neighbor."""
    d = params.dilation[h.dim]
    if h.shard_size % d:
        return (f"fused-triton's query offsets need shards of a multiple of the dilation {d} rows "
                f"(shards of {h.shard_size})")
    if _offset_halo(params, h).left > h.shard_size:
        return "the left halo widened to a multiple of the dilation exceeds the shard"
    return None


# Backends whose kernels take a query offset into a larger key extent (global coordinates), and
# for each, why a given sharding cannot use it (None: it can).
OFFSET_BACKENDS = {
    "reference": lambda params, h: None,
    "fused-triton": _fused_triton_offset_route,
}

# Spatial routes (``method=``): see the module docstring.
METHODS = ("auto", "offset", "slab", "ulysses")


# ---------------------------------------------------------------------------------------------
# Host side: halo widths and slab plans
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Halo:
    """The key rows a spatial shard needs from its neighbors, along the sharded axis.

    Attributes:
      dim: the sharded spatial axis.
      num_shards: shards along it; ``shard_size = length // num_shards`` rows each.
      left, right: rows received from the previous / next shard (the maximum over shards of what
        each needs, so that one uniform `ppermute` serves all). ``right == 0`` when causal.
      per_shard: the exact ``(left, right)`` need of every shard (border shards need less on
        their outer side, and may need *more* on the inner side: windows shift inward there).
    """

    dim: int
    length: int
    num_shards: int
    shard_size: int
    left: int
    right: int
    per_shard: tuple[tuple[int, int], ...]

    @property
    def extent(self) -> int:
        """Rows of the extended key slab of one shard: ``left + shard_size + right``."""
        return self.left + self.shard_size + self.right


def _window_key_range(params: semantics.NAParams, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """First and last key (original coordinates) of every query's window on axis ``dim``."""
    length, k, s, d, causal = params.axis(dim)
    x = np.arange(length, dtype=np.int64)
    g = x % d
    start = semantics.window_start(x, length, k, s, d, causal)
    stop = semantics.window_stop(x, length, k, s, d, causal)
    return g + d * start, g + d * (stop - 1)


def _check_dim(params: semantics.NAParams, dim: int) -> int:
    if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or not 0 <= dim < params.rank:
        raise ValueError(f"spatial_dim = {dim!r} is invalid: the input has {params.rank} spatial axes "
                         f"(0 to {params.rank - 1}).")
    return int(dim)


def _shard_size(params: semantics.NAParams, num_shards: int, dim: int) -> int:
    """Rows per shard of spatial axis ``dim`` (every route needs an even split: the inputs are
    laid out sharded along it)."""
    length = params.spatial_shape[dim]
    if num_shards < 1 or length % num_shards:
        raise ValueError(
            f"spatial axis {dim} has length {length}, which {num_shards} shards cannot split evenly; "
            f"choose a mesh axis size that divides it (or another spatial_dim)."
        )
    return length // num_shards


def halo(params: semantics.NAParams, num_shards: int, dim: int = 0) -> Halo:
    """Halo widths for sharding spatial axis ``dim`` of ``params`` into ``num_shards`` shards.

    Computed exactly from the window rules (`jna.semantics`): shard ``i`` owning rows
    ``[a, b)`` needs keys ``[min first key, max last key]`` over its queries' windows (dilation,
    stride, causality and the inward shift at the global border included).

    Raises:
      ValueError: the axis length is not a multiple of ``num_shards``, or a shard is smaller
        than the halo (a halo must come from the immediate neighbor).
    """
    dim = _check_dim(params, dim)
    length = params.spatial_shape[dim]
    n = _shard_size(params, num_shards, dim)
    first, last = _window_key_range(params, dim)
    per_shard = []
    for i in range(num_shards):
        a, b = i * n, (i + 1) * n
        per_shard.append((max(0, a - int(first[a:b].min())), max(0, int(last[a:b].max()) - (b - 1))))
    left = max(p[0] for p in per_shard) if num_shards > 1 else 0
    right = max(p[1] for p in per_shard) if num_shards > 1 else 0
    if num_shards > 1 and max(left, right) > n:
        raise ValueError(
            f"spatial sharding of axis {dim} (length {length}) over {num_shards} shards gives shards "
            f"of {n} rows, smaller than the halo their windows need (left {left}, right {right} rows "
            f"for kernel_size {params.kernel_size[dim]}, stride {params.stride[dim]}, dilation "
            f"{params.dilation[dim]}, causal {params.is_causal[dim]}); a halo must come from the "
            f"immediate neighbor: use fewer shards, another spatial_dim, or head/batch sharding."
        )
    return Halo(dim, length, num_shards, n, left, right, tuple(per_shard))


@dataclasses.dataclass(frozen=True)
class SlabPlan:
    """How a backend without query offsets runs a spatial shard (``method="slab"``).

    Shard ``i`` runs plain NA on slab rows ``[starts[i], starts[i] + size)`` (global coordinates)
    of the sharded axis, whose data it has (own rows plus the halo; slab rows outside that are
    zeros that no own query attends), and keeps its own ``shard_size`` rows.
    ``ok`` is False with ``reason`` when no exact slab exists.
    """

    halo: Halo
    size: int
    starts: tuple[int, ...]
    ok: bool
    reason: str

    @property
    def waste(self) -> float:
        """Computed query rows over useful rows: ``size / shard_size`` (>= 1)."""
        return self.size / self.halo.shard_size


def _slab_exact(params: semantics.NAParams, dim: int, start: int, size: int, a: int, b: int) -> str | None:
    """None if NA on slab ``[start, start+size)`` gives every query in ``[a, b)`` its global window."""
    length, k, s, d, causal = params.axis(dim)
    if start < 0 or start + size > length or not (start <= a and b <= start + size):
        return f"slab [{start}, {start + size}) does not hold shard rows [{a}, {b}) inside the input"
    if k * d > size:
        return f"slab of {size} rows is shorter than the dilated window {k} * {d}"
    x = np.arange(a, b, dtype=np.int64)[:, None]
    j = np.arange(k, dtype=np.int64)[None, :]
    y_global, ok_global = semantics.neighbor(x, j, length, k, s, d, causal)
    y_local, ok_local = semantics.neighbor(x - start, j, size, k, s, d, causal)
    ok_global = np.broadcast_to(ok_global, y_global.shape)
    ok_local = np.broadcast_to(ok_local, y_local.shape)
    bad = (ok_global != ok_local) | (ok_global & (y_local + start != y_global))
    if bad.any():
        row = int(np.argwhere(bad)[0][0]) + a
        return (f"query {row} of axis {dim} sees a different window on slab [{start}, {start + size}) "
                f"than in the whole input (stride {s}, dilation {d}, causal {causal})")
    return None


@functools.lru_cache(maxsize=256)
def slab_plan(params: semantics.NAParams, num_shards: int, dim: int = 0) -> SlabPlan:
    """The exact slab of every shard for backends without query offsets (see `SlabPlan`).

    Slab starts are aligned to ``stride * dilation`` (so stride groups and dilation groups keep
    their global phase) and clipped into the input (so windows shift at the global border as
    they should); every shard's own windows are then verified against `jna.semantics`.
    """
    h = halo(params, num_shards, dim)
    length, n = h.length, h.shard_size
    m = params.stride[dim] * params.dilation[dim]
    size = min(length, -(-(n + h.left + h.right + (m - 1 if m > 1 else 0)) // m) * m)
    hi = ((length - size) // m) * m
    starts, reasons = [], []
    for i in range(num_shards):
        a, b = i * n, (i + 1) * n
        start = min(max(((a - h.left) // m) * m, 0), hi)
        starts.append(start)
        why = _slab_exact(params, dim, start, size, a, b)
        if why is not None:
            reasons.append(why)
    return SlabPlan(h, size, tuple(starts), not reasons, reasons[0] if reasons else "")


# ---------------------------------------------------------------------------------------------
# Host side: the byte model that picks between the halo routes and Ulysses
# ---------------------------------------------------------------------------------------------


def ulysses_reason(heads: int, kv_heads: int, num_shards: int,
                   axis_name: str | None = None) -> str | None:
    """Why Ulysses cannot split these heads over ``num_shards`` devices, or None.

    ``heads`` / ``kv_heads``: the query / kv heads one shard holds before the all_to_all (after
    any ``head_axis`` sharding). Both are split into ``num_shards`` contiguous blocks, block ``i``
    of the query heads with block ``i`` of the kv heads, so both must divide (a GQA group never
    straddles two devices then). ``axis_name``: the spatial mesh axis, for the message."""
    bad = [f"{what} ({count})" for what, count in (("heads", heads), ("kv heads", kv_heads))
           if count % num_shards]
    if not bad:
        return None
    where = f"spatial_axis={axis_name!r}" if axis_name else "the spatial mesh axis"
    return (f"Ulysses splits the heads over the {num_shards} devices of {where}, "
            f"but {' and '.join(bad)} per shard (after head_axis) are not divisible by {num_shards}")


def route_bytes(params: semantics.NAParams, num_shards: int, dim: int = 0, *, batch: int = 1,
                heads: int, kv_heads: int | None = None, head_dim: int,
                value_dim: int | None = None, dtype: Any = "bfloat16") -> dict:
    """Bytes one spatial shard sends (and receives) in the forward pass, per route.

    A pure host-side function of the static shapes, the byte model behind ``method="auto"``.
    ``batch``, ``heads``, ``kv_heads`` (default ``heads``) are what one shard of the spatial mesh
    axis holds (after batch/head sharding); ``head_dim`` ``D``, ``value_dim`` ``D_v`` (default
    ``D``); ``dtype`` of q, k, v (its item size ``b``); ``P = num_shards``, ``L`` the length of
    axis ``dim``, ``n = L / P``, ``C`` the cross-section ``batch * prod(other spatial axes)``:

    * ``"halo"``: K and V rows of the halo, both directions:
      ``(left + right) * C * kv_heads * (D + D_v) * b`` (`halo` widths; fused-triton's offset
      route widens ``left`` to a multiple of the dilation, which the model ignores). None (and
      ``"halo_error"``) when no halo exists: a shard narrower than its halo.
    * ``"ulysses"``: every all_to_all keeps ``1/P`` of a tensor and sends ``(P-1)/P``: q, k, v in,
      out and the float32 logsumexp back:
      ``(P-1)/P * n * C * (heads * (D + D_v) + kv_heads * (D + D_v)) * b + (P-1)/P * n * C * heads * 4``
      (about 4 shard-sized tensors times ``(P-1)/P`` without GQA). None (and
      ``"ulysses_error"``) when the heads do not divide (`ulysses_reason`).
    * ``"fewer"``: ``"ulysses"`` if it applies and moves strictly fewer bytes than the halo (or no
      halo exists), ``"halo"`` if the halo exists, else None.

    Forward+backward moves twice each (the backward sends the halo gradients back, or runs the
    transposed all_to_alls of dout/dlse and dq/dk/dv), so the comparison is the same.
    """
    kv_heads = heads if kv_heads is None else kv_heads
    value_dim = head_dim if value_dim is None else value_dim
    dim = _check_dim(params, dim)
    n = _shard_size(params, num_shards, dim)
    itemsize = np.dtype(jnp.dtype(dtype)).itemsize
    cross = batch * int(np.prod([x for a, x in enumerate(params.spatial_shape) if a != dim]))
    out = dict(halo=None, halo_error=None, ulysses=None, ulysses_error=None, fewer=None)
    try:
        h = halo(params, num_shards, dim)
    except ValueError as e:
        out["halo_error"] = str(e)
    else:
        out["halo"] = (h.left + h.right) * cross * kv_heads * (head_dim + value_dim) * itemsize
    why = ulysses_reason(heads, kv_heads, num_shards)
    if why is None:
        kept = num_shards - 1  # blocks of P sent away, of a shard's n rows: exact, heads divide
        per_row = ((heads + kv_heads) * (head_dim + value_dim) * itemsize + heads * 4) // num_shards
        out["ulysses"] = kept * n * cross * per_row
    else:
        out["ulysses_error"] = why
    if out["ulysses"] is not None and (out["halo"] is None or out["ulysses"] < out["halo"]):
        out["fewer"] = "ulysses"
    elif out["halo"] is not None:
        out["fewer"] = "halo"
    return out


# ---------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------

AxisNames = Any  # None, a mesh axis name, or a tuple of names


def _names(axes: AxisNames) -> tuple[str, ...]:
    if axes is None:
        return ()
    return tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)


def _spec_entry(axes: AxisNames):
    names = _names(axes)
    if not names:
        return None
    return names[0] if len(names) == 1 else names


def partition_spec(rank: int, batch_axis: AxisNames = None, head_axis: AxisNames = None,
                   spatial_axis: str | None = None, spatial_dim: int = 0, trailing: bool = True) -> P:
    """The `PartitionSpec` of a ``[B, *X, H, D]`` array (``trailing=False``: ``[B, *X, H]``).

    Use it to place q/k/v with `jax.device_put(x, NamedSharding(mesh, spec))`; the outputs of
    `neighborhood_attention` come back with this spec.
    """
    spatial = [spatial_axis if a == spatial_dim else None for a in range(rank)]
    entries = [_spec_entry(batch_axis), *spatial, _spec_entry(head_axis)]
    return P(*entries, None) if trailing else P(*entries)


def _mesh_size(mesh: Mesh, axes: AxisNames, what: str) -> int:
    size = 1
    for name in _names(axes):
        if name not in mesh.shape:
            raise ValueError(f"{what} = {name!r} is not an axis of the mesh (axes: {tuple(mesh.shape)}).")
        size *= mesh.shape[name]
    return size


# ---------------------------------------------------------------------------------------------
# Per-shard computation
# ---------------------------------------------------------------------------------------------


def _exchange(x, h: Halo, axis: int, axis_name: str):
    """``[left halo, x, right halo]`` along array axis ``axis`` via ppermute (zeros at the ends)."""
    p = h.num_shards
    parts = []
    if h.left:
        tail = jax.lax.slice_in_dim(x, x.shape[axis] - h.left, x.shape[axis], axis=axis)
        parts.append(jax.lax.ppermute(tail, axis_name, [(i, i + 1) for i in range(p - 1)]))
    parts.append(x)
    if h.right:
        head = jax.lax.slice_in_dim(x, 0, h.right, axis=axis)
        parts.append(jax.lax.ppermute(head, axis_name, [(i, i - 1) for i in range(1, p)]))
    return jnp.concatenate(parts, axis=axis) if len(parts) > 1 else x


def _exchange_kv(k, v, h: Halo, axis: int, axis_name: str):
    """Halo exchange of k and v in one message per direction (packed along the last axis)."""
    dk = k.shape[-1]
    kv = _exchange(jnp.concatenate([k, v], axis=-1), h, axis, axis_name)
    return kv[..., :dk], kv[..., dk:]


def _offset_halo(params: semantics.NAParams, h: Halo) -> Halo:
    """``h`` with its left width rounded up to a multiple of the axis' dilation (fused-triton's
    offset route: its key slab must start on one)."""
    d = params.dilation[h.dim]
    return dataclasses.replace(h, left=-(-h.left // d) * d)


def _kernel_offset_shard(q, k_ext, v_ext, problem, h: Halo, module, index):
    """A kernel backend's offset route: shard ``index`` (traced) runs its own queries against
    the part of its halo-extended keys that lies inside the input. The plans are static per
    shard (their query and key origins, and the border shards' shorter slabs), so every shard's
    call is traced and `lax.switch` runs this device's one."""
    from jna._src import plan as planning

    dim, n, length = h.dim, h.shard_size, h.length
    axis = 1 + dim
    local = dataclasses.replace(problem, batch=q.shape[0], heads=q.shape[-2], kv_heads=k_ext.shape[-2],
                                num_extra=0)

    def shard(i, q, k_ext, v_ext):
        first = i * n - h.left  # global row of k_ext's row 0
        kv_start, kv_stop = max(0, first), min(length, (i + 1) * n + h.right)
        spans = [None] * problem.rank
        spans[dim] = planning.AxisSpan(i * n, n, kv_start, kv_stop - kv_start)
        cut = lambda x: jax.lax.slice_in_dim(x, kv_start - first, kv_stop - first, axis=axis)
        return module.attention(q, cut(k_ext), cut(v_ext), local, spans=tuple(spans))

    branches = [functools.partial(shard, i) for i in range(h.num_shards)]
    return jax.lax.switch(index, branches, q, k_ext, v_ext)


def _local_spatial(q, k, v, problem, h: Halo, method: str, module, axis_name: str):
    """NA of this shard's own queries over its halo-extended keys (inside shard_map)."""
    dim, n = h.dim, h.shard_size
    axis = 1 + dim  # array axis of the sharded spatial axis
    index = jax.lax.axis_index(axis_name)
    own_start = index * n
    if method == "offset" and module.name != "reference":
        h = _offset_halo(problem.params, h)
        k_ext, v_ext = _exchange_kv(k, v, h, axis, axis_name)
        return _kernel_offset_shard(q, k_ext, v_ext, problem, h, module, index)
    k_ext, v_ext = _exchange_kv(k, v, h, axis, axis_name)
    if method == "offset":
        coords = [jnp.arange(length, dtype=jnp.int32) for length in problem.spatial_shape]
        coords[dim] = own_start + jnp.arange(n, dtype=jnp.int32)
        offsets = [0] * problem.rank
        offsets[dim] = own_start - h.left
        return reference.attention_window(q, k_ext, v_ext, problem, coords, offsets)

    plan = slab_plan(problem.params, h.num_shards, dim)
    size = plan.size
    slab_start = jnp.asarray(plan.starts, jnp.int32)[index]
    # k/v: the received extent starts at global own_start - left; pad with zeros so any slab
    # position outside it reads zeros (no own query attends those, `slab_plan` verified that).
    pad = [(0, 0)] * k_ext.ndim
    pad[axis] = (size, size)
    kv_first = slab_start - (own_start - h.left) + size

    def cut(x):
        x = jnp.pad(x, pad)
        return jax.lax.dynamic_slice_in_dim(x, kv_first, size, axis=axis)

    k_slab, v_slab = cut(k_ext), cut(v_ext)
    q_shape = list(q.shape)
    q_shape[axis] = size
    q_slab = jax.lax.dynamic_update_slice_in_dim(jnp.zeros(q_shape, q.dtype), q, own_start - slab_start, axis)
    local = check_call(q_slab, k_slab, v_slab, problem.params.kernel_size, problem.params.stride,
                       problem.params.dilation, problem.params.is_causal, problem.scale, None, None,
                       problem.rank)
    out, lse = module.attention(q_slab, k_slab, v_slab, local)
    out = jax.lax.dynamic_slice_in_dim(out, own_start - slab_start, n, axis=axis)
    lse = jax.lax.dynamic_slice_in_dim(lse, own_start - slab_start, n, axis=axis)
    return out, lse


def _local_ulysses(q, k, v, problem, module, axis_name: str, dim: int):
    """Ulysses (inside shard_map): all_to_all to head sharding, NA on the whole grid, and back.

    In (this shard, ``P`` shards along mesh axis ``axis_name``, ``X_n``: the spatial shape with
    ``n = L / P`` rows on axis ``dim``): q ``[B, *X_n, H, D]``, k ``[B, *X_n, H_kv, D]``,
    v ``[B, *X_n, H_kv, D_v]``. After the all_to_alls (tiled: head block ``j`` goes to shard
    ``j``, received row blocks are concatenated in shard order, i.e. the global row order):
    q ``[B, *X, H/P, D]``, k/v ``[B, *X, H_kv/P, D/D_v]`` on the whole grid ``X``, heads block
    ``axis_index`` (query heads ``[i H/P, (i+1) H/P)`` use kv heads ``[i H_kv/P, (i+1) H_kv/P)``:
    GQA's ``h // (H / H_kv)`` stays inside the block). The backend's ordinary call runs there;
    out ``[B, *X, H/P, D_v]`` and lse ``[B, *X, H/P]`` go back by the reverse all_to_alls to
    ``[B, *X_n, H, D_v]`` / ``[B, *X_n, H]``. Autodiff transposes each all_to_all into its
    reverse, so the backward moves dout/dlse and dq/dk/dv the same way.
    """
    axis = 1 + dim  # array axis of the sharded spatial axis

    def to_heads(x):  # [B, *X_n, h, d] -> [B, *X, h/P, d]
        return jax.lax.all_to_all(x, axis_name, x.ndim - 2, axis, tiled=True)

    # One all_to_all per tensor (q has H heads, k/v H_kv; packing them would need extra copies).
    qf, kf, vf = to_heads(q), to_heads(k), to_heads(v)
    local = dataclasses.replace(problem, batch=qf.shape[0], heads=qf.shape[-2],
                                kv_heads=kf.shape[-2], num_extra=0)
    out, lse = module.attention(qf, kf, vf, local)
    out = jax.lax.all_to_all(out, axis_name, axis, out.ndim - 2, tiled=True)
    lse = jax.lax.all_to_all(lse, axis_name, axis, lse.ndim - 1, tiled=True)
    return out, lse


def _halo_route(name: str, problem, h: Halo, method: str) -> tuple[str | None, str | None]:
    """``(route, None)``: the halo route (``"offset"``/``"slab"``) backend ``name`` runs for
    ``method`` (``"auto"``, ``"offset"`` or ``"slab"``), or ``(None, why not)``."""
    plan = slab_plan(problem.params, h.num_shards, h.dim)
    why = []
    if method in ("auto", "offset"):
        if name in OFFSET_BACKENDS:
            reason = OFFSET_BACKENDS[name](problem.params, h)
            if reason is None:
                return "offset", None
            why.append(reason)
        else:
            why.append(f"backend {name!r} takes no query offset (backends with offsets: "
                       f"{', '.join(OFFSET_BACKENDS)})")
    if method in ("auto", "slab"):
        if plan.ok:
            return "slab", None
        why.append(f"no exact slab: {plan.reason}")
    return None, "; ".join(why)


def _spatial_route(backend: str, problem, h: Halo, method: str, stacklevel: int = 3):
    """``(module, method)`` of the halo routes for a spatially sharded call; raises when none
    applies (``backend="auto"`` first falls back to ``reference`` with a warning)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}.")
    if method == "ulysses":
        raise ValueError("_spatial_route chooses among the halo routes; 'ulysses' goes through "
                         "_choose_route.")
    module = backends.resolve(backend, problem)
    name = module.name
    route, why = _halo_route(name, problem, h, method)
    if route is not None:
        return module, route
    if backend == "auto" and name != "reference":
        warnings.warn(f"jna.sharding: backend {name!r} cannot run this spatially sharded call ({why}); "
                      f"using backend 'reference'.", stacklevel=stacklevel)
        module = backends.resolve("reference", problem)
        route, why2 = _halo_route("reference", problem, h, method)
        if route is not None:
            return module, route
        why = why2
    raise NotImplementedError(
        f"backend={backend!r} cannot run this call sharded along spatial axis {h.dim} "
        f"(method={method!r}): {why}."
    )


def _choose_route(backend, problem, num_shards: int, dim: int, method: str, heads: int,
                  kv_heads: int, batch: int, axis_name: str | None = None,
                  ) -> tuple[Any, str, Halo | None]:
    """``(module, route, halo)`` of a call spatially sharded ``num_shards`` ways along ``dim``.

    ``heads``, ``kv_heads``, ``batch``: what one shard holds (after batch/head sharding);
    ``axis_name``: the spatial mesh axis (for the error messages). ``halo``
    is None for Ulysses (it exchanges no halo). See the module docstring for ``method="auto"``.

    Raises:
      ValueError: a bad ``method``, an axis length not divisible by ``num_shards``, or (halo
        routes, and ``auto`` when Ulysses cannot run either) shards smaller than the halo.
      NotImplementedError: ``method="ulysses"`` with heads or kv heads not divisible by
        ``num_shards``; a backend that can run no route (see `_spatial_route`).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}.")
    params = problem.params
    _shard_size(params, num_shards, dim)
    ulysses_why = ulysses_reason(heads, kv_heads, num_shards, axis_name)
    if method == "ulysses":
        if ulysses_why is not None:
            raise NotImplementedError(
                f"method='ulysses' cannot shard this call along spatial axis {dim}: {ulysses_why}; "
                f"use a spatial mesh axis whose size divides both head counts, or method='offset'/'slab'.")
        return backends.resolve(backend, problem), "ulysses", None
    if method in ("offset", "slab"):
        h = halo(params, num_shards, dim)
        return (*_spatial_route(backend, problem, h, method, stacklevel=5), h)
    # auto: the halo route of the resolved backend, or Ulysses when it applies and moves fewer
    # bytes (`route_bytes`), or when no halo route exists.
    try:
        h = halo(params, num_shards, dim)
    except ValueError as e:
        if ulysses_why is None:
            return backends.resolve(backend, problem), "ulysses", None
        raise ValueError(f"{e} (method='ulysses', which has no halo, cannot run it either: "
                         f"{ulysses_why})") from None
    if ulysses_why is None:
        module = backends.resolve(backend, problem)
        route, _ = _halo_route(module.name, problem, h, "auto")
        model = route_bytes(params, num_shards, dim, batch=batch, heads=heads, kv_heads=kv_heads,
                            head_dim=problem.head_dim, value_dim=problem.value_dim, dtype=problem.dtype)
        if route is None or model["fewer"] == "ulysses":
            return module, "ulysses", None
    return (*_spatial_route(backend, problem, h, "auto", stacklevel=5), h)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _setup(q, k, v, kernel_size, stride, dilation, is_causal, scale, additional_keys,
           additional_values, backend, mesh, batch_axis, head_axis, spatial_axis, spatial_dim,
           method):
    """Validates a sharded call: ``(problem, (batch, head, spatial shard counts), route)``, with
    ``route`` = `_choose_route`'s ``(module, route, halo)``, or None without spatial sharding."""
    backends.check_backend_name(backend)
    problem = check_call(q, k, v, kernel_size, stride, dilation, is_causal, scale, additional_keys,
                         additional_values, None)
    spatial_dim = _check_dim(problem.params, spatial_dim)
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}.")
    nb = _mesh_size(mesh, batch_axis, "batch_axis")
    nh = _mesh_size(mesh, head_axis, "head_axis")
    if spatial_axis is not None and not isinstance(spatial_axis, str):
        raise ValueError(f"spatial_axis must be one mesh axis name, got {spatial_axis!r}.")
    ns = _mesh_size(mesh, spatial_axis, "spatial_axis")
    used = _names(batch_axis) + _names(head_axis) + _names(spatial_axis)
    if len(set(used)) != len(used):
        raise ValueError(f"a mesh axis is used twice among batch_axis, head_axis, spatial_axis: {used}.")
    if problem.batch % nb:
        raise ValueError(f"batch {problem.batch} is not divisible by the {nb} shards of "
                         f"batch_axis={batch_axis!r}.")
    for what, count in (("q heads", problem.heads), ("kv heads", problem.kv_heads)):
        if count % nh:
            raise ValueError(f"{what} ({count}) are not divisible by the {nh} shards of "
                             f"head_axis={head_axis!r}.")
    route = None
    if spatial_axis is not None and ns > 1:
        route = _choose_route(backend, problem, ns, spatial_dim, method, problem.heads // nh,
                              problem.kv_heads // nh, problem.batch // nb, spatial_axis)
    return problem, (nb, nh, ns), route


def spatial_route(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, backend="auto", *,
                  mesh: Mesh, batch_axis: AxisNames = None, head_axis: AxisNames = None,
                  spatial_axis: str | None = None, spatial_dim: int = 0,
                  method: str = "auto") -> str | None:
    """The route `neighborhood_attention` takes for these arguments: ``"offset"``, ``"slab"``,
    ``"ulysses"``, or None (no spatial sharding: a plain call per shard).

    ``q, k, v`` may be arrays or `jax.ShapeDtypeStruct` s (global shapes); the other arguments
    are `neighborhood_attention`'s. Raises what that call would raise for them.
    """
    _, _, route = _setup(q, k, v, kernel_size, stride, dilation, is_causal, None, None, None,
                         backend, mesh, batch_axis, head_axis, spatial_axis, spatial_dim, method)
    return None if route is None else route[1]


def neighborhood_attention(
    q,
    k,
    v,
    kernel_size,
    stride=1,
    dilation=1,
    is_causal=False,
    scale=None,
    additional_keys=None,
    additional_values=None,
    return_lse=False,
    backend="auto",
    *,
    mesh: Mesh,
    batch_axis: AxisNames = None,
    head_axis: AxisNames = None,
    spatial_axis: str | None = None,
    spatial_dim: int = 0,
    method: str = "auto",
):
    """`jna.neighborhood_attention` with its inputs sharded over ``mesh``.

    Args:
      q, k, v, kernel_size, ..., backend: as in `jna.neighborhood_attention` (global shapes).
      mesh: the device mesh.
      batch_axis: mesh axis name(s) that shard the batch, or None.
      head_axis: mesh axis name(s) that shard the heads (q heads and kv heads alike), or None.
      spatial_axis: a mesh axis name that shards spatial axis ``spatial_dim``, or None.
      spatial_dim: which spatial axis to shard (0: the first).
      method: the spatial route: ``"auto"``, ``"offset"``, ``"slab"`` (halo exchange) or
        ``"ulysses"`` (all-to-all to head sharding and back); see the module docstring.
        `spatial_route` says which one ``"auto"`` takes.

    The inputs are laid out as `partition_spec` says (jit re-shards them if they are not), the
    outputs come back with that sharding. Usable inside and outside `jax.jit`, differentiable.

    Returns:
      ``out`` (and ``lse`` with ``return_lse``), as `jna.neighborhood_attention`.

    Raises:
      ValueError: bad arguments, mesh axes, sizes not divisible by the mesh, or shards smaller
        than the halo (halo routes; ``auto`` takes Ulysses then if the heads divide).
      NotImplementedError: a backend that can run neither halo route (see ``method``), or
        ``method="ulysses"`` with heads or kv heads not divisible by the spatial mesh axis size.
    """
    problem, _, chosen = _setup(
        q, k, v, kernel_size, stride, dilation, is_causal, scale, additional_keys,
        additional_values, backend, mesh, batch_axis, head_axis, spatial_axis, spatial_dim, method)
    rank = problem.rank
    spatial_dim = int(spatial_dim)

    spec = partition_spec(rank, batch_axis, head_axis, spatial_axis, spatial_dim)
    lse_spec = partition_spec(rank, batch_axis, head_axis, spatial_axis, spatial_dim, trailing=False)
    extra_spec = P(_spec_entry(batch_axis), None, _spec_entry(head_axis), None)
    has_extra = problem.num_extra > 0

    if chosen is not None:
        module, route, h = chosen

        def local(q, k, v, ek, ev):
            if route == "ulysses":
                out, lse = _local_ulysses(q, k, v, problem, module, spatial_axis, spatial_dim)
            else:
                out, lse = _local_spatial(q, k, v, problem, h, route, module, spatial_axis)
            if has_extra:
                extra_out, extra_lse = dense_attention(q, ek, ev, problem.scale)
                out, lse = merge_attentions([out, extra_out], [lse, extra_lse])
            return out, lse
    else:

        def local(q, k, v, ek, ev):
            from jna.functional import neighborhood_attention as na

            return na(q, k, v, kernel_size, stride, dilation, is_causal, problem.scale, ek, ev,
                      return_lse=True, backend=backend)

    extra_specs = (extra_spec, extra_spec) if has_extra else (None, None)
    mapped = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(spec, spec, spec, *extra_specs),
        out_specs=(spec, lse_spec),
        check_vma=False,
    )
    args = [q, k, v, additional_keys, additional_values]
    specs = (spec, spec, spec, *extra_specs)
    # Eager calls: place concrete arrays on the mesh (a no-op if they are there already); under
    # jit the in_specs re-shard traced values.
    args = [x if x is None or isinstance(x, jax.core.Tracer)
            else jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(args, specs)]
    out, lse = mapped(*args)
    return (out, lse) if return_lse else out


def _fixed_rank(rank: int):
    def na(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
           additional_keys=None, additional_values=None, return_lse=False, backend="auto", *,
           mesh, batch_axis=None, head_axis=None, spatial_axis=None, spatial_dim=0, method="auto"):
        if q.ndim != rank + 3:
            raise ValueError(f"q has {q.ndim} dimensions {tuple(q.shape)}, expected {rank + 3} for "
                             f"{rank}-D neighborhood attention.")
        return neighborhood_attention(
            q, k, v, kernel_size, stride, dilation, is_causal, scale, additional_keys,
            additional_values, return_lse, backend, mesh=mesh, batch_axis=batch_axis,
            head_axis=head_axis, spatial_axis=spatial_axis, spatial_dim=spatial_dim, method=method)

    na.__name__ = na.__qualname__ = f"na{rank}d"
    na.__doc__ = f"{rank}-D `jna.sharding.neighborhood_attention`."
    return na


na1d = _fixed_rank(1)
na2d = _fixed_rank(2)
na3d = _fixed_rank(3)
