"""The `reference` backend: neighborhood attention in plain jax.numpy.

Each query gathers its ``prod(K)`` window keys and values (slot ``j`` of axis ``a`` comes from
`jna.semantics.neighbor`), so memory is O(N * prod(K)) at most, never O(N^2). To keep even large
windows within memory, the window slots are visited in chunks with an online (flash-style)
softmax carried in float32; each chunk's gather is rematerialized in the backward pass
(`jax.checkpoint`), so autodiff stores only the per-chunk carries.

Relative positional bias (``rpb``, `supports_rpb`): each chunk also gathers the bias of its
(query, slot) pairs from the table (indices from `jna.semantics.relative_position_index_of_key`
on the same coordinates), added in float32 after scaling; its gradient (a scatter-add into the
table) and forward-mode derivatives come from JAX autodiff like everything else here.

This is the portable fallback (any device, jit/vmap/grad by JAX autodiff) and the "naive"
baseline of the benchmarks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from jna import semantics
from jna._src.arguments import NAProblem
from jna.backends.base import Backend

NAME = "reference"

# Elements of gathered keys + values per chunk (per call). 2**26 float32 elements = 256 MiB:
# large enough to vectorize small windows in one step, small enough for big maps.
GATHER_BUDGET_ELEMENTS = 2**26

_HIGHEST = jax.lax.Precision.HIGHEST


def is_available() -> tuple[bool, str]:
    return True, ""


def runs_natively() -> bool:
    return True


def unsupported_reason(problem: NAProblem) -> str | None:
    del problem
    return None


def slots_per_chunk(problem: NAProblem, budget: int = GATHER_BUDGET_ELEMENTS) -> int:
    """How many window slots one chunk gathers at once (at least 1, at most prod(K))."""
    per_slot = problem.batch * problem.params.num_tokens * problem.kv_heads * (
        problem.head_dim + problem.value_dim
    )
    return int(max(1, min(problem.params.window_size, budget // max(per_slot, 1))))


def _chunk_neighbors(params: semantics.NAParams, first_slot, chunk: int, query_coords=None,
                     key_offsets=None, bias_index: bool = False):
    """Key positions of window slots ``first_slot .. first_slot + chunk - 1`` of every query.

    Args:
      params: the (global) problem; windows follow its lengths.
      first_slot, chunk: the slots of this chunk (row-major over the window).
      query_coords: per axis, the global coordinates of the local queries (an int32 array, may be
        traced), or None for every axis: ``arange(length)``.
      key_offsets: per axis, the global coordinate of local key index 0 (may be traced), or None:
        0. Returned indices are local: ``global key - key_offsets[axis]``.
      bias_index: also return the flat relative-positional-bias index of each (query, slot).

    Returns:
      ``(indices, valid)``: ``indices`` is a tuple (one per axis) of int32 arrays that broadcast
      to ``[*Xq, chunk]``, ready for advanced indexing; ``valid`` is bool ``[*Xq, chunk]``. Slots
      past ``prod(K)`` (padding of the last chunk) are invalid and point at slot ``prod(K) - 1``.
      With ``bias_index``, a third entry: int32 ``[*Xq, chunk]``, the row-major flat index into
      ``rpb[h]`` (`jna.semantics.flat_relative_position_index`; global coordinates).
    """
    rank = params.rank
    if query_coords is None:
        query_coords = [jnp.arange(n, dtype=jnp.int32) for n in params.spatial_shape]
    if key_offsets is None:
        key_offsets = [0] * rank
    local_shape = tuple(int(c.shape[0]) for c in query_coords)
    slot = first_slot + jnp.arange(chunk, dtype=jnp.int32)
    in_window = slot < params.window_size
    slot = jnp.minimum(slot, params.window_size - 1)
    # Row-major unravel of the flat slot index into per-axis slots j_a.
    per_axis_slot = []
    rest = slot
    for axis in reversed(range(rank)):
        per_axis_slot.append(rest % params.kernel_size[axis])
        rest = rest // params.kernel_size[axis]
    per_axis_slot.reverse()

    indices, valid, bias = [], in_window, []
    for axis in range(rank):
        length, k, s, d, causal = params.axis(axis)
        n = local_shape[axis]
        x = query_coords[axis][:, None]
        y, ok = semantics.neighbor(x, per_axis_slot[axis][None, :], length, k, s, d, causal, xp=jnp)
        # Put this axis's length at position `axis` of [*Xq, chunk].
        shape = [1] * rank + [chunk]
        shape[axis] = n
        if bias_index:  # from global coordinates, before the key offset makes y local
            bias.append(semantics.relative_position_index_of_key(x, y, k, d).reshape(shape))
        y = y - key_offsets[axis]
        indices.append(y.reshape(shape))
        valid = valid & jnp.broadcast_to(ok, (n, chunk)).reshape(shape)
    valid = jnp.broadcast_to(valid, (*local_shape, chunk))
    if not bias_index:
        return tuple(indices), valid
    flat = semantics.flat_relative_position_index(bias, params.kernel_size)
    return tuple(indices), valid, jnp.broadcast_to(flat, (*local_shape, chunk))


def attention(q, k, v, problem: NAProblem, rpb=None):
    """Neighborhood attention of ``q`` over ``k``/``v``.

    Args:
      q: ``[B, *X, H, D]``; k: ``[B, *X, H_kv, D]``; v: ``[B, *X, H_kv, D_v]``.
      problem: the validated call (`jna._src.arguments.check_call`).
      rpb: None or the relative positional bias ``[H, 2K_1 - 1, ..., 2K_n - 1]`` (float32 or q's
        dtype; validated by `jna._src.arguments.check_rpb`).

    Returns:
      ``(out, lse)``: ``[B, *X, H, D_v]`` in q's dtype and ``[B, *X, H]`` float32.
    """
    return attention_window(q, k, v, problem, rpb=rpb)


def attention_window(q, k, v, problem: NAProblem, query_coords=None, key_offsets=None, rpb=None):
    """Neighborhood attention of some queries of a larger problem over a slab of its keys.

    This is the reference backend's *query offset into a larger key extent*, used by spatial
    sharding (`jna.sharding`): windows are those of the global problem ``problem.params``, the
    local queries sit at global coordinates ``query_coords`` and local key index ``i`` of axis
    ``a`` is global key ``key_offsets[a] + i``. Every window key of every local query must lie in
    the local key slab (the caller sizes it; `jna.sharding.halo` computes the widths).

    Args:
      q: ``[B, *Xq, H, D]``; k: ``[B, *Xk, H_kv, D]``; v: ``[B, *Xk, H_kv, D_v]``. Only
        ``problem.params`` and ``problem.scale`` are read from ``problem``; sizes come from the
        arrays (the batch and heads may be a shard of the problem's).
      query_coords: per axis, int32 ``[Xq[a]]`` global coordinates of the local queries (traced
        values allowed); None means the whole axis (``arange``).
      key_offsets: per axis, the global coordinate of local key 0 (traced allowed); None: 0.
      rpb: None or the bias table ``[H, 2K_1 - 1, ..., 2K_n - 1]`` of the local heads, indexed
        by global coordinates.

    Returns:
      ``(out, lse)``: ``[B, *Xq, H, D_v]`` in q's dtype and ``[B, *Xq, H]`` float32.
    """
    params = problem.params
    # Upcast before gathering: the gather's transpose (a scatter-add of every query's
    # contribution) then accumulates key/value gradients in float32, not in bf16/fp16.
    k, v = jnp.asarray(k).astype(jnp.float32), jnp.asarray(v).astype(jnp.float32)
    batch, local_shape, heads, head_dim = q.shape[0], tuple(q.shape[1:-2]), q.shape[-2], q.shape[-1]
    kv_heads, value_dim = v.shape[-2], v.shape[-1]
    group = heads // kv_heads
    n = math.prod(local_shape)
    per_slot = batch * n * kv_heads * (head_dim + value_dim)
    chunk = int(max(1, min(params.window_size, GATHER_BUDGET_ELEMENTS // max(per_slot, 1))))
    num_chunks = math.ceil(params.window_size / chunk)

    qg = (jnp.asarray(q).astype(jnp.float32) * problem.scale).reshape(batch, n, kv_heads, group, head_dim)
    # Query head h = kv head h // group, member h % group: the bias table in the logits' layout.
    table = None if rpb is None else jnp.asarray(rpb).astype(jnp.float32).reshape(kv_heads, group, -1)

    def step(carry, chunk_index):
        m, l, acc = carry
        found = _chunk_neighbors(params, chunk_index * chunk, chunk, query_coords, key_offsets,
                                 bias_index=table is not None)
        indices, valid = found[:2]
        kj = k[(slice(None), *indices)].reshape(batch, n, chunk, kv_heads, -1)
        vj = v[(slice(None), *indices)].reshape(batch, n, chunk, kv_heads, -1)
        s = jnp.einsum("bnhgd,bnchd->bnhgc", qg, kj, precision=_HIGHEST)
        if table is not None:  # after scaling, as NATTEN: [h_kv, g, n, chunk] -> [n, h_kv, g, chunk]
            s = s + jnp.moveaxis(table[:, :, found[2].reshape(n, chunk)], 2, 0)[None]
        # `where`, not a multiply: a masked slot must not let a NaN/inf key leak in.
        s = jnp.where(valid.reshape(1, n, 1, 1, chunk), s, -jnp.inf)
        m_new = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(s, axis=-1)))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        alpha = jnp.exp(m - m_safe)
        p = jnp.exp(s - m_safe[..., None])
        l = alpha * l + jnp.sum(p, axis=-1)
        # A masked slot points at an in-window key (see _chunk_neighbors), so p == 0 there never
        # multiplies a value the query could not legitimately see.
        acc = alpha[..., None] * acc + jnp.einsum("bnhgc,bnchd->bnhgd", p, vj, precision=_HIGHEST)
        return (m_new, l, acc), None

    init = (
        jnp.full((batch, n, kv_heads, group), -jnp.inf, jnp.float32),
        jnp.zeros((batch, n, kv_heads, group), jnp.float32),
        jnp.zeros((batch, n, kv_heads, group, value_dim), jnp.float32),
    )
    step = jax.checkpoint(step)
    if num_chunks == 1:
        (m, l, acc), _ = step(init, jnp.int32(0))
    else:
        (m, l, acc), _ = jax.lax.scan(step, init, jnp.arange(num_chunks, dtype=jnp.int32))
    out = (acc / l[..., None]).reshape(batch, *local_shape, heads, value_dim)
    lse = (m + jnp.log(l)).reshape(batch, *local_shape, heads)
    return out.astype(q.dtype), lse


@dataclasses.dataclass(frozen=True)
class Reference(Backend):
    """reference: pure jax.numpy over each query's gathered window (any device; no tile config)."""

    name: ClassVar[str] = NAME
    supports_rpb: ClassVar[bool] = True

    is_available = staticmethod(is_available)
    runs_natively = staticmethod(runs_natively)
    supports = staticmethod(unsupported_reason)

    def attention(self, q, k, v, problem: NAProblem, rpb=None):
        return attention(q, k, v, problem, rpb)
