"""Neighborhood attention over many devices: batch/head parallel and spatial halo exchange.

A Pallas call is opaque to XLA's SPMD partitioner, so jna runs its kernels per shard inside
`jax.shard_map` and says explicitly what moves between devices:

* **batch and head sharding** (mesh axes ``batch_axis`` / ``head_axis``): every shard runs the
  chosen backend on its own batch entries / heads; no communication at all. With GQA the query
  heads and the kv heads are split into the same number of contiguous blocks, which keeps the
  ``h -> h // (H // H_kv)`` mapping inside each block.
* **spatial (context) sharding** along one spatial axis (``spatial_dim``, the first by default)
  over mesh axis ``spatial_axis``: shard ``i`` owns query and key rows ``[i*n, (i+1)*n)`` of that
  axis. It receives a *halo* of keys and values from its neighbors (`jax.lax.ppermute`, K and V
  packed into one message per direction) exactly as wide as the windows of its queries need
  (`halo`), then computes NA for its own queries over the extended key slab with *global*
  coordinates, so windows shift at the global border only, never at a shard border. Autodiff
  transposes the ppermutes: the backward pass sends the halo gradients back to their owners.

How a shard computes its queries over the slab (``method``):

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
* ``"auto"``: ``offset`` when the backend has it, else ``slab``.

An explicitly named backend never falls back: if neither route can run the call, that is an error.
``backend="auto"`` resolves as in `jna.neighborhood_attention`; under spatial sharding, if the
resolved backend can run neither route, it falls back to ``reference`` with a warning.

The result equals the single-device result (to float32 rounding for the offset route; the slab
route runs the same backend on a different tiling, so it matches to that backend's tolerance).
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
    "partition_spec",
    "neighborhood_attention",
    "na1d",
    "na2d",
    "na3d",
    "OFFSET_BACKENDS",
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

METHODS = ("auto", "offset", "slab")


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
    if num_shards < 1 or length % num_shards:
        raise ValueError(
            f"spatial axis {dim} has length {length}, which {num_shards} shards cannot split evenly; "
            f"choose a mesh axis size that divides it (or another spatial_dim)."
        )
    n = length // num_shards
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


def _spatial_route(backend: str, problem, h: Halo, method: str):
    """``(module, method)`` for a spatially sharded call; raises when none applies."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}.")
    module = backends.resolve(backend, problem)
    name = module.name

    def routes_for(name):
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

    route, why = routes_for(name)
    if route is not None:
        return module, route
    if backend == "auto" and name != "reference":
        warnings.warn(f"jna.sharding: backend {name!r} cannot run this spatially sharded call ({why}); "
                      f"using backend 'reference'.", stacklevel=3)
        module = backends.resolve("reference", problem)
        route, why2 = routes_for("reference")
        if route is not None:
            return module, route
        why = why2
    raise NotImplementedError(
        f"backend={backend!r} cannot run this call sharded along spatial axis {h.dim} "
        f"(method={method!r}): {why}."
    )


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


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
      method: how a spatial shard computes its queries: ``"auto"``, ``"offset"`` or ``"slab"``
        (see the module docstring).

    The inputs are laid out as `partition_spec` says (jit re-shards them if they are not), the
    outputs come back with that sharding. Usable inside and outside `jax.jit`, differentiable.

    Returns:
      ``out`` (and ``lse`` with ``return_lse``), as `jna.neighborhood_attention`.

    Raises:
      ValueError: bad arguments, mesh axes, sizes not divisible by the mesh, or shards smaller
        than the halo.
      NotImplementedError: a backend that can run neither spatial route (see ``method``).
    """
    backends.check_backend_name(backend)
    problem = check_call(q, k, v, kernel_size, stride, dilation, is_causal, scale, additional_keys,
                         additional_values, None)
    rank = problem.rank
    spatial_dim = _check_dim(problem.params, spatial_dim)
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

    spec = partition_spec(rank, batch_axis, head_axis, spatial_axis, spatial_dim)
    lse_spec = partition_spec(rank, batch_axis, head_axis, spatial_axis, spatial_dim, trailing=False)
    extra_spec = P(_spec_entry(batch_axis), None, _spec_entry(head_axis), None)
    has_extra = problem.num_extra > 0

    if spatial_axis is not None and ns > 1:
        h = halo(problem.params, ns, spatial_dim)
        module, route = _spatial_route(backend, problem, h, method)

        def local(q, k, v, ek, ev):
            out, lse = _local_spatial(q, k, v, problem, h, route, module, spatial_axis)
            if has_extra:
                extra_out, extra_lse = dense_attention(q, ek, ev, problem.scale)
                out, lse = merge_attentions([out, extra_out], [lse, extra_lse])
            return out, lse
    else:
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not one of {METHODS}.")

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
