"""The rules of neighborhood attention, in one place (docs/semantics.md, NATTEN 0.21).

Everything that decides *which keys a query may attend* lives here:

* argument normalization and validation (`normalize_params`), which turns the user's ints,
  bools and per-axis tuples into a frozen, validated `NAParams`;
* the per-axis window functions (`window_start`, `window_stop`, `neighbor`, `key_allowed`),
  written once and usable on Python ints, numpy arrays and traced jax values alike (pass
  ``xp=jnp`` inside jax code, including Pallas kernels). The reference backend, the tile planner
  and in-kernel edge masks all call these; nobody re-derives the rules;
* the relative positional bias index (NATTEN 0.17's ``rpb``): per (query, key) pair
  (`relative_position_index_of_key`, for kernels that know both coordinates), per (query, window
  slot) (`relative_position_index`), flattened over axes (`flat_relative_position_index`), and
  as host tables (`axis_relative_position_table`, `relative_position_table`).

Per axis (length ``L``, kernel ``K``, stride ``s``, dilation ``d``) a query at coordinate ``x``
may attend a key at ``y`` iff ``x % d == y % d`` and, in group coordinates
``x' = x // d``, ``y' = y // d`` of a group of length ``Lg = ceil((L - x % d) / d)``:

* non-causal: ``leader = min((x' // s) * s + s // 2, Lg - 1)``,
  ``start = clamp(leader - K // 2, 0, Lg - K)``, allowed iff ``start <= y' < start + K``;
* causal: ``leader = min((x' // s) * s + s - 1, Lg - 1)``,
  allowed iff ``max(leader - K + 1, 0) <= y' <= x'``.

The multi-dimensional rule is the AND over axes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, Sequence

import numpy as np

__all__ = [
    "NAParams",
    "normalize_params",
    "normalize_per_axis",
    "group_length",
    "window_start",
    "window_stop",
    "neighbor",
    "key_allowed",
    "axis_neighbor_table",
    "relative_position_index",
    "relative_position_index_of_key",
    "flat_relative_position_index",
    "axis_relative_position_table",
    "relative_position_table",
]

_AXIS_PARAMS = ("kernel_size", "stride", "dilation")


@dataclasses.dataclass(frozen=True)
class NAParams:
    """Validated neighborhood-attention parameters for one call; all fields are per-axis tuples.

    Hashable, so it can key caches (tile plans) and be a static argument of `jax.jit`.
    """

    spatial_shape: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]

    @property
    def rank(self) -> int:
        return len(self.spatial_shape)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.spatial_shape)

    @property
    def window_size(self) -> int:
        """``prod(kernel_size)``: the number of window slots of every query."""
        return math.prod(self.kernel_size)

    @property
    def is_self_attention(self) -> bool:
        """True when the window covers the whole map on every axis and nothing is causal.

        Then NA is plain self-attention (every query sees every key).
        """
        return all(k == length for k, length in zip(self.kernel_size, self.spatial_shape)) and not any(
            self.is_causal
        )

    def axis(self, i: int) -> tuple[int, int, int, int, bool]:
        """``(length, kernel_size, stride, dilation, is_causal)`` of axis ``i``."""
        return (
            self.spatial_shape[i],
            self.kernel_size[i],
            self.stride[i],
            self.dilation[i],
            self.is_causal[i],
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def normalize_per_axis(name: str, value: Any, rank: int, kind: type) -> tuple:
    """Turns an int/bool or a per-axis sequence into a tuple of length ``rank``.

    Args:
      name: the argument's name, used in error messages.
      value: a scalar or a sequence of ``rank`` scalars.
      rank: number of spatial axes.
      kind: ``int`` or ``bool``; bools are not accepted as ints and ints not as bools.

    Raises:
      ValueError: naming the argument (and axis) when the type or length is wrong.
    """
    check = _is_int if kind is int else _is_bool
    what = "an integer" if kind is int else "a bool"
    if isinstance(value, (list, tuple)):
        if len(value) != rank:
            raise ValueError(
                f"{name} has {len(value)} entries {tuple(value)!r}, but the input has {rank} "
                f"spatial axes; pass one value or a tuple of {rank}."
            )
        for axis, item in enumerate(value):
            if not check(item):
                raise ValueError(f"{name}[{axis}] must be {what}, got {item!r} ({type(item).__name__}).")
        return tuple(kind(item) for item in value)
    if not check(value):
        raise ValueError(
            f"{name} must be {what} or a tuple of {rank}, got {value!r} ({type(value).__name__})."
        )
    return (kind(value),) * rank


def normalize_params(
    spatial_shape: Sequence[int],
    kernel_size: Any,
    stride: Any = 1,
    dilation: Any = 1,
    is_causal: Any = False,
) -> NAParams:
    """Normalizes and validates the per-axis NA arguments against a spatial shape.

    Rules per axis: ``2 <= kernel_size``, ``kernel_size * dilation <= length``,
    ``1 <= stride <= kernel_size``, ``dilation >= 1``.

    Raises:
      ValueError: naming the argument, the axis and the value that breaks a rule.
    """
    spatial_shape = tuple(int(n) for n in spatial_shape)
    rank = len(spatial_shape)
    ks = normalize_per_axis("kernel_size", kernel_size, rank, int)
    st = normalize_per_axis("stride", stride, rank, int)
    dl = normalize_per_axis("dilation", dilation, rank, int)
    ca = normalize_per_axis("is_causal", is_causal, rank, bool)
    for axis in range(rank):
        length, k, s, d = spatial_shape[axis], ks[axis], st[axis], dl[axis]
        if k < 2:
            raise ValueError(f"kernel_size[{axis}] = {k} is invalid: it must be at least 2.")
        if d < 1:
            raise ValueError(f"dilation[{axis}] = {d} is invalid: it must be at least 1.")
        if s < 1:
            raise ValueError(f"stride[{axis}] = {s} is invalid: it must be at least 1.")
        if s > k:
            raise ValueError(
                f"stride[{axis}] = {s} is invalid: it must not exceed kernel_size[{axis}] = {k}."
            )
        if k * d > length:
            raise ValueError(
                f"kernel_size[{axis}] * dilation[{axis}] = {k} * {d} = {k * d} exceeds the input's "
                f"length {length} on spatial axis {axis}."
            )
    return NAParams(spatial_shape, ks, st, dl, ca)


# ---------------------------------------------------------------------------------------------
# Per-axis window functions. `xp` is numpy (host: planner, oracle tables) or jax.numpy (traced:
# reference backend, kernels). Only +, -, *, //, %, minimum, maximum are used, so the same code
# runs on Python ints, numpy arrays and jax values. The static parameters (K, s, d, causal,
# length) are Python values.
# ---------------------------------------------------------------------------------------------


def group_length(g, length: int, dilation: int):
    """``ceil((length - g) / dilation)``: the length of dilation group ``g``."""
    return (length - g + dilation - 1) // dilation


def _leader(xg, lg, kernel_size: int, stride: int, is_causal: bool, xp):
    offset = stride - 1 if is_causal else stride // 2
    return xp.minimum((xg // stride) * stride + offset, lg - 1)


def window_start(x, length: int, kernel_size: int, stride: int, dilation: int, is_causal: bool, xp=np):
    """First allowed key of query ``x``, in group coordinates ``y'`` (key ``y = x % d + d * y'``)."""
    g = x % dilation
    xg = x // dilation
    lg = group_length(g, length, dilation)
    leader = _leader(xg, lg, kernel_size, stride, is_causal, xp)
    if is_causal:
        return xp.maximum(leader - kernel_size + 1, 0)
    return xp.minimum(xp.maximum(leader - kernel_size // 2, 0), lg - kernel_size)


def window_stop(x, length: int, kernel_size: int, stride: int, dilation: int, is_causal: bool, xp=np):
    """One past the last allowed key of query ``x``, in group coordinates.

    Non-causal windows always hold ``kernel_size`` keys; causal ones stop at the query itself.
    """
    if is_causal:
        return x // dilation + 1
    return window_start(x, length, kernel_size, stride, dilation, is_causal, xp) + kernel_size


def neighbor(x, j, length: int, kernel_size: int, stride: int, dilation: int, is_causal: bool, xp=np):
    """Key coordinate of window slot ``j`` (0 <= j < kernel_size) of query ``x``, and its validity.

    Slot ``j`` is the ``j``-th key of the window in increasing order (NATTEN's row-major window
    order). Every non-causal slot is valid; a causal slot past the query is not, and then the
    returned coordinate is clamped to the query itself (always a valid, finite position).

    Returns:
      ``(y, valid)``: ``y`` in original coordinates, ``valid`` a bool (array).
    """
    g = x % dilation
    yg = window_start(x, length, kernel_size, stride, dilation, is_causal, xp) + j
    if is_causal:
        valid = yg <= x // dilation
        yg = xp.minimum(yg, x // dilation)
    else:
        valid = yg == yg  # all True, with the broadcast shape of the inputs
    return g + dilation * yg, valid


def relative_position_index_of_key(x, y, kernel_size: int, dilation: int):
    """Relative-positional-bias index of (query ``x``, key ``y``) on one axis: ``(y' - x') + K - 1``.

    NATTEN 0.17's rule in group coordinates (``x' = x // d``, ``y' = y // d``). For a key that
    the query may attend with a non-causal, stride-1 window, ``|y' - x'| <= K - 1``, so the index
    lies in ``[0, 2K - 2]``: a bias table has ``2K - 1`` entries per axis. Only ``//``, ``-`` and
    ``+``: works on Python ints, numpy arrays and traced jax values (inside kernels too). The
    result for a pair the query may not attend is meaningless (mask such pairs first).
    """
    return y // dilation - x // dilation + kernel_size - 1


def relative_position_index(x, j, length: int, kernel_size: int, stride: int, dilation: int,
                            is_causal: bool, xp=np):
    """Relative-positional-bias index of window slot ``j`` of query ``x`` on one axis.

    `relative_position_index_of_key` of the slot's key (`neighbor`). Defined for non-causal
    windows (NATTEN never had causal bias); with stride 1 every window holds its query, so the
    index is in ``[0, 2K - 2]``.
    """
    y, _ = neighbor(x, j, length, kernel_size, stride, dilation, is_causal, xp)
    return relative_position_index_of_key(x, y, kernel_size, dilation)


def flat_relative_position_index(per_axis: Sequence[Any], kernel_size: Sequence[int]):
    """Row-major flat index into ``rpb[h].reshape(-1)`` (``rpb[h]``: ``[2K_1 - 1, ..., 2K_n - 1]``)
    from the per-axis indices (ints or broadcastable arrays, numpy or jax)."""
    flat = per_axis[0]
    for index, k in zip(per_axis[1:], kernel_size[1:]):
        flat = flat * (2 * k - 1) + index
    return flat


def axis_relative_position_table(params: NAParams, axis: int) -> np.ndarray:
    """Host-side ``[length, kernel_size]`` int32: the bias index of slot ``j`` of query ``x`` on
    one axis (`relative_position_index`; the layout of `axis_neighbor_table`)."""
    length, k, s, d, causal = params.axis(axis)
    x = np.arange(length, dtype=np.int64)[:, None]
    j = np.arange(k, dtype=np.int64)[None, :]
    return relative_position_index(x, j, length, k, s, d, causal, xp=np).astype(np.int32)


@functools.lru_cache(maxsize=64)
def relative_position_table(params: NAParams) -> np.ndarray:
    """Host-side ``[*X, prod(K)]`` int32 (cached; read-only): the flat bias index
    (`flat_relative_position_index`) of every (query, window slot), slots in row-major window
    order. ``rpb[h].reshape(-1)[table]`` is head ``h``'s bias of every logit of `na*d_qk`."""
    slots = np.indices(params.kernel_size).reshape(params.rank, -1)  # [rank, prod(K)], row-major
    per_axis = []
    for axis in range(params.rank):
        table = axis_relative_position_table(params, axis)[:, slots[axis]]  # [L_axis, prod(K)]
        shape = [1] * params.rank + [params.window_size]
        shape[axis] = params.spatial_shape[axis]
        per_axis.append(table.astype(np.int64).reshape(shape))
    flat = flat_relative_position_index(per_axis, params.kernel_size)
    flat = np.broadcast_to(flat, (*params.spatial_shape, params.window_size)).astype(np.int32)
    flat.setflags(write=False)  # shared by every caller of the cache
    return flat


def key_allowed(x, y, length: int, kernel_size: int, stride: int, dilation: int, is_causal: bool, xp=np):
    """Whether query ``x`` may attend key ``y`` on one axis (both in original coordinates)."""
    same_group = (x % dilation) == (y % dilation)
    yg = y // dilation
    start = window_start(x, length, kernel_size, stride, dilation, is_causal, xp)
    stop = window_stop(x, length, kernel_size, stride, dilation, is_causal, xp)
    return same_group & (start <= yg) & (yg < stop)


def axis_neighbor_table(params: NAParams, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Host-side table of every query's window on one axis.

    Returns:
      ``(coords, valid)``, both ``[length, kernel_size]``: ``coords[x, j]`` is the key
      coordinate of slot ``j`` of query ``x`` (int32), ``valid[x, j]`` whether it is allowed.
    """
    length, k, s, d, causal = params.axis(axis)
    x = np.arange(length, dtype=np.int64)[:, None]
    j = np.arange(k, dtype=np.int64)[None, :]
    coords, valid = neighbor(x, j, length, k, s, d, causal, xp=np)
    return coords.astype(np.int32), np.broadcast_to(valid, coords.shape).copy()
