"""The layer computation shared by the linen (`jna.nn`) and NNX (`jna.nnx`) modules.

Each framework owns its parameters (the ``qkv`` and ``proj`` dense layers, the ``rpb`` table) and
its dropout; everything from the input to the output projection's result is `attend` here, so
the two modules compute exactly the same thing from the same weights.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp

from jna import semantics
from jna.functional import neighborhood_attention


def rpb_init(key, shape, dtype=jnp.float32):
    """NATTEN 0.17's bias init: ``trunc_normal_(rpb, std=.02, mean=0., a=-2., b=2.)``.

    A normal of standard deviation 0.02 truncated to the absolute interval ``[-2, 2]``
    (100 standard deviations, as in torch's ``trunc_normal_``).
    """
    std = 0.02
    return (std * jax.random.truncated_normal(key, -2.0 / std, 2.0 / std, shape, jnp.float32)).astype(dtype)


class LayerFields(Protocol):
    """The fields `attend` reads; both the linen and the NNX modules have them."""

    rank: int
    num_heads: int
    kernel_size: Any
    stride: Any
    dilation: Any
    is_causal: Any
    qk_scale: float | None
    backend: str


def rpb_shape(num_heads: int, kernel_size, rank: int) -> tuple[int, ...]:
    """``(num_heads, 2K_1 - 1, ..., 2K_rank - 1)``: the shape of NATTEN 0.17's bias table."""
    kernel_size = semantics.normalize_per_axis("kernel_size", kernel_size, rank, int)
    return (num_heads, *(2 * k - 1 for k in kernel_size))


def check_proj_drop(proj_drop) -> None:
    """``proj_drop`` is a rate in ``[0, 1]`` (ValueError naming it otherwise)."""
    if not 0.0 <= proj_drop <= 1.0:
        raise ValueError(f"proj_drop must be a dropout rate in [0, 1], got {proj_drop!r}.")


def check_heads(channels: int, num_heads: int, what: str) -> int:
    """The head dimension ``channels // num_heads`` (ValueError naming num_heads if inexact)."""
    if num_heads < 1 or channels % num_heads != 0:
        raise ValueError(f"{what} ({channels}) must be divisible by num_heads ({num_heads}).")
    return channels // num_heads


def attend(layer: LayerFields, x, qkv: Callable, proj: Callable, rpb=None):
    """Fused QKV projection -> neighborhood attention -> output projection (no dropout).

    NATTEN's layer: ``qkv(x)`` is split as ``[..., 3, num_heads, head_dim]`` into q, k, v, and the
    attention is `jna.neighborhood_attention` on ``layer.backend``, with NATTEN 0.17's relative
    positional bias when ``rpb`` is given (``auto`` then picks a backend that supports it; an
    explicit backend without it raises NotImplementedError naming ``rpb``).

    Args:
      layer: the module, for its window fields (`LayerFields`) and its name in errors.
      x: ``[B, *X, C]`` with ``layer.rank`` spatial axes.
      qkv: the dense layer ``[..., C] -> [..., 3C]``.
      proj: the dense layer ``[..., C] -> [..., C]``.
      rpb: ``None`` or the bias table ``[num_heads, 2K_1 - 1, ..., 2K_rank - 1]``.

    Returns:
      ``[B, *X, C]``: ``proj`` of the attention output.
    """
    name = type(layer).__name__
    if x.ndim != layer.rank + 2:
        raise ValueError(
            f"x has {x.ndim} dimensions {tuple(x.shape)}; {name} takes "
            f"[batch, {layer.rank} spatial axes, channels]."
        )
    channels = x.shape[-1]
    head_dim = check_heads(channels, layer.num_heads, "x's channels")
    q, k, v = jnp.unstack(qkv(x).reshape(*x.shape[:-1], 3, layer.num_heads, head_dim), axis=-3)
    window = dict(kernel_size=layer.kernel_size, stride=layer.stride, dilation=layer.dilation,
                  is_causal=layer.is_causal)
    if rpb is not None:
        # The bias is added in float32 whatever the parameter and compute dtypes (NATTEN adds it
        # to float32 logits); as float32 it is accepted with q of any dtype (`check_rpb`).
        rpb = jnp.asarray(rpb).astype(jnp.float32)
    out = neighborhood_attention(q, k, v, **window, scale=layer.qk_scale, backend=layer.backend,
                                 rpb=rpb)
    return proj(out.reshape(*x.shape[:-1], channels))
