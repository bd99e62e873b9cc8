"""Validation of the tensors and options of one NA call, done once, before any backend runs.

`check_call` turns the public API's arguments into an `NAProblem`: the validated per-axis
parameters (`jna.semantics.NAParams`) plus the shapes, head counts, dtype and scale that
backends need. Everything a user can get wrong is a `ValueError` that names the argument, the
axis and the value; nothing is computed before these checks pass.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jna import semantics

__all__ = ["NAProblem", "check_call", "check_qk_call", "check_av_call", "check_rpb", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


@dataclasses.dataclass(frozen=True)
class NAProblem:
    """Static description of one validated NA call (hashable: usable as a cache key).

    Shapes: q ``[batch, *spatial_shape, heads, head_dim]``,
    k ``[batch, *spatial_shape, kv_heads, head_dim]``,
    v ``[batch, *spatial_shape, kv_heads, value_dim]``.
    """

    params: semantics.NAParams
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    value_dim: int
    dtype: Any
    scale: float
    num_extra: int  # additional key/value tokens (0 when none)
    # A relative positional bias ``rpb`` comes with the call (validated by `check_rpb`). Part of
    # the static description so that backends can decline it (`Backend.supports_rpb`) and
    # ``auto`` never picks a backend that would drop it.
    has_rpb: bool = False

    @property
    def rank(self) -> int:
        return self.params.rank

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self.params.spatial_shape


def _static_int(name: str, value: Any) -> Any:
    """Rejects traced values for arguments that decide shapes, with advice on jit."""
    if isinstance(value, jax.core.Tracer):
        raise ValueError(
            f"{name} must be a static Python value, got a traced value inside a jax transformation. "
            f"Under jax.jit pass it through static_argnames=('{name}',) or close over it "
            f"(functools.partial)."
        )
    if isinstance(value, (list, tuple)):
        for item in value:
            _static_int(name, item)
    return value


def _array_like(name: str, x: Any):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"{name} must be an array, got {type(x).__name__}.")
    return x


def _check_dtype(name: str, x: Any, dtype: Any) -> None:
    if jnp.dtype(x.dtype) != dtype:
        raise ValueError(
            f"{name} has dtype {jnp.dtype(x.dtype).name} but q has dtype {jnp.dtype(dtype).name}; "
            f"q, k, v (and additional keys/values) must share one dtype."
        )


def check_call(
    q,
    k,
    v,
    kernel_size,
    stride,
    dilation,
    is_causal,
    scale,
    additional_keys,
    additional_values,
    rank: int | None,
    rpb=None,
) -> NAProblem:
    """Validates one NA call and returns its static description.

    Args:
      q: ``[B, *X, H, D]``; k: ``[B, *X, H_kv, D]``; v: ``[B, *X, H_kv, D_v]``.
      kernel_size, stride, dilation, is_causal: int/bool or per-axis tuples (static).
      scale: None (``D ** -0.5``) or a static Python number.
      additional_keys: None or ``[B, N_extra, H_kv, D]``; additional_values likewise with ``D_v``.
      rank: the number of spatial axes the caller expects (na1d: 1, ...), or None to take it
        from ``q.ndim - 3`` (1, 2 or 3).
      rpb: None or a relative positional bias ``[H, 2K_1 - 1, ..., 2K_n - 1]`` (`check_rpb`);
        sets ``has_rpb`` of the result.

    Raises:
      ValueError: naming the argument, axis and value of the first problem found.
      NotImplementedError: ``rpb`` with causal masking or stride > 1 (`check_rpb`).
    """
    q, k, v = _array_like("q", q), _array_like("k", k), _array_like("v", v)
    for name, value in (("kernel_size", kernel_size), ("stride", stride), ("dilation", dilation),
                        ("is_causal", is_causal)):
        _static_int(name, value)

    if rank is None:
        rank = q.ndim - 3
        if rank not in (1, 2, 3):
            raise ValueError(
                f"q has {q.ndim} dimensions {tuple(q.shape)}; neighborhood attention takes "
                f"[batch, *spatial (1 to 3 axes), heads, head_dim], i.e. 4 to 6 dimensions."
            )
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != rank + 3:
            raise ValueError(
                f"{name} has {x.ndim} dimensions {tuple(x.shape)}, expected {rank + 3}: "
                f"[batch, {rank} spatial axes, heads, head_dim] for {rank}-D neighborhood attention."
            )

    dtype = jnp.dtype(q.dtype)
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"q has dtype {dtype.name}; supported dtypes are float32, float16 and bfloat16."
        )
    _check_dtype("k", k, dtype)
    _check_dtype("v", v, dtype)

    batch, spatial = q.shape[0], tuple(q.shape[1:-2])
    for name, x in (("k", k), ("v", v)):
        if x.shape[0] != batch:
            raise ValueError(f"{name}.shape[0] (batch) = {x.shape[0]} differs from q's batch {batch}.")
        for axis, (n_x, n_q) in enumerate(zip(x.shape[1:-2], spatial)):
            if n_x != n_q:
                raise ValueError(
                    f"{name}.shape[{axis + 1}] (spatial axis {axis}) = {n_x} differs from q's {n_q}."
                )
    heads, head_dim = q.shape[-2], q.shape[-1]
    kv_heads, value_dim = v.shape[-2], v.shape[-1]
    if k.shape[-2] != kv_heads:
        raise ValueError(f"k has {k.shape[-2]} heads but v has {kv_heads}; they must match.")
    if k.shape[-1] != head_dim:
        raise ValueError(f"k's head_dim {k.shape[-1]} differs from q's head_dim {head_dim}.")
    if heads % kv_heads != 0:
        raise ValueError(
            f"q's heads ({heads}) must be a multiple of k/v's heads ({kv_heads}) for grouped-query "
            f"attention."
        )
    for name, n in (("heads", heads), ("head_dim", head_dim), ("value_dim", value_dim), ("batch", batch)):
        if n < 1:
            raise ValueError(f"q/k/v have an empty {name} dimension.")

    params = semantics.normalize_params(spatial, kernel_size, stride, dilation, is_causal)

    if scale is None:
        scale = float(head_dim) ** -0.5
    else:
        _static_int("scale", scale)
        if not isinstance(scale, (numbers.Real, np.floating)) or isinstance(scale, bool):
            raise ValueError(f"scale must be a Python number or None, got {scale!r}.")
        scale = float(scale)
        if not np.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}.")

    num_extra = 0
    if (additional_keys is None) != (additional_values is None):
        missing = "additional_values" if additional_values is None else "additional_keys"
        raise ValueError(f"additional_keys and additional_values come together; {missing} is missing.")
    if additional_keys is not None:
        ak = _array_like("additional_keys", additional_keys)
        av = _array_like("additional_values", additional_values)
        for name, x, last, last_name in (("additional_keys", ak, head_dim, "head_dim"),
                                         ("additional_values", av, value_dim, "value_dim")):
            if x.ndim != 4 or x.shape[0] != batch or x.shape[2] != kv_heads or x.shape[3] != last:
                raise ValueError(
                    f"{name} has shape {tuple(x.shape)}, expected [batch={batch}, N_extra, "
                    f"kv_heads={kv_heads}, {last_name}={last}]."
                )
            _check_dtype(name, x, dtype)
        if ak.shape[1] != av.shape[1]:
            raise ValueError(
                f"additional_keys has {ak.shape[1]} tokens but additional_values has {av.shape[1]}."
            )
        if ak.shape[1] < 1:
            raise ValueError("additional_keys/additional_values have no tokens; pass None instead.")
        num_extra = int(ak.shape[1])

    problem = NAProblem(
        params=params,
        batch=int(batch),
        heads=int(heads),
        kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        value_dim=int(value_dim),
        dtype=dtype,
        scale=scale,
        num_extra=num_extra,
    )
    if rpb is None:
        return problem
    check_rpb(rpb, problem)
    return dataclasses.replace(problem, has_rpb=True)


# ---------------------------------------------------------------------------------------------
# Unfused ops (`jna.na*d_qk`, `jna.na*d_av`): the same rules, other tensors.
# ---------------------------------------------------------------------------------------------


def check_qk_call(q, k, kernel_size, stride, dilation, is_causal, scale, rank: int | None) -> NAProblem:
    """Validates ``na*d_qk(q, k, ...)``: q ``[B, *X, H, D]``, k ``[B, *X, H_kv, D]``.

    The returned problem has ``value_dim == head_dim`` (there is no v).

    Raises:
      ValueError: naming the argument, axis and value of the first problem found.
    """
    k = _array_like("k", k)
    return check_call(q, k, k, kernel_size, stride, dilation, is_causal, scale, None, None, rank)


def check_rpb(rpb, problem: NAProblem) -> None:
    """Validates a relative positional bias ``rpb: [H, 2K_1 - 1, ..., 2K_n - 1]`` for a call.

    ``H`` is the number of *query* heads (with GQA too). The dtype is float32 or q's dtype (the
    bias is added in float32 either way; another half type would be a silent conversion).

    Raises:
      NotImplementedError: with causal masking or stride > 1 on any axis (NATTEN 0.17 defines
        the bias for non-causal, stride-1 windows only).
      ValueError: naming ``rpb`` when it is not an array of that shape and dtype.
    """
    rpb = _array_like("rpb", rpb)
    params = problem.params
    for axis in range(params.rank):
        if params.is_causal[axis]:
            raise NotImplementedError(
                f"rpb (relative positional bias) is not supported with is_causal[{axis}] = True; "
                f"it is defined for non-causal windows only."
            )
        if params.stride[axis] != 1:
            raise NotImplementedError(
                f"rpb (relative positional bias) is not supported with stride[{axis}] = "
                f"{params.stride[axis]}; it is defined for stride 1 only."
            )
    want = (problem.heads, *(2 * k - 1 for k in params.kernel_size))
    if tuple(rpb.shape) != want:
        raise ValueError(
            f"rpb has shape {tuple(rpb.shape)}, expected [heads, 2*kernel_size - 1 per axis] = "
            f"{list(want)}."
        )
    allowed = (jnp.dtype(jnp.float32), jnp.dtype(problem.dtype))
    if jnp.dtype(rpb.dtype) not in allowed:
        raise ValueError(
            f"rpb has dtype {jnp.dtype(rpb.dtype).name}; it must be float32 or q's dtype "
            f"({jnp.dtype(problem.dtype).name})."
        )


def check_av_call(attn, v, kernel_size, stride, dilation, is_causal, rank: int | None) -> NAProblem:
    """Validates ``na*d_av(attn, v, ...)``: attn ``[B, *X, H, prod(K)]``, v ``[B, *X, H_kv, D_v]``.

    ``attn`` may be float32 or v's dtype. The returned problem's ``head_dim`` is ``D_v`` (there
    is no q; ``prod(K)`` is the width of attn) and its dtype is v's.

    Raises:
      ValueError: naming the argument, axis and value of the first problem found.
    """
    attn, v = _array_like("attn", attn), _array_like("v", v)
    for name, value in (("kernel_size", kernel_size), ("stride", stride), ("dilation", dilation),
                        ("is_causal", is_causal)):
        _static_int(name, value)
    if rank is None:
        rank = attn.ndim - 3
        if rank not in (1, 2, 3):
            raise ValueError(
                f"attn has {attn.ndim} dimensions {tuple(attn.shape)}; it takes "
                f"[batch, *spatial (1 to 3 axes), heads, prod(kernel_size)], i.e. 4 to 6 dimensions."
            )
    for name, x in (("attn", attn), ("v", v)):
        if x.ndim != rank + 3:
            raise ValueError(
                f"{name} has {x.ndim} dimensions {tuple(x.shape)}, expected {rank + 3}: "
                f"[batch, {rank} spatial axes, heads, channels] for {rank}-D neighborhood attention."
            )
    dtype = jnp.dtype(v.dtype)
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"v has dtype {dtype.name}; supported dtypes are float32, float16 and bfloat16.")
    attn_dtype = jnp.dtype(attn.dtype)
    if attn_dtype not in (jnp.dtype(jnp.float32), dtype):
        raise ValueError(
            f"attn has dtype {attn_dtype.name}; it must be float32 or v's dtype ({dtype.name})."
        )
    batch, spatial = attn.shape[0], tuple(attn.shape[1:-2])
    if v.shape[0] != batch:
        raise ValueError(f"v.shape[0] (batch) = {v.shape[0]} differs from attn's batch {batch}.")
    for axis, (n_v, n_a) in enumerate(zip(v.shape[1:-2], spatial)):
        if n_v != n_a:
            raise ValueError(f"v.shape[{axis + 1}] (spatial axis {axis}) = {n_v} differs from attn's {n_a}.")
    heads, kv_heads = attn.shape[-2], v.shape[-2]
    if kv_heads < 1 or heads % kv_heads != 0:
        raise ValueError(
            f"attn's heads ({heads}) must be a multiple of v's heads ({kv_heads}) for grouped-query "
            f"attention."
        )
    for name, n in (("heads", heads), ("value_dim", v.shape[-1]), ("batch", batch)):
        if n < 1:
            raise ValueError(f"attn/v have an empty {name} dimension.")
    params = semantics.normalize_params(spatial, kernel_size, stride, dilation, is_causal)
    if attn.shape[-1] != params.window_size:
        raise ValueError(
            f"attn's last axis has {attn.shape[-1]} entries; it must be prod(kernel_size) = "
            f"{params.window_size} (the window slots)."
        )
    return NAProblem(
        params=params,
        batch=int(batch),
        heads=int(heads),
        kv_heads=int(kv_heads),
        head_dim=int(v.shape[-1]),
        value_dim=int(v.shape[-1]),
        dtype=dtype,
        scale=1.0,
        num_extra=0,
    )
