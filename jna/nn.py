"""Flax linen modules: neighborhood attention layers mirroring NATTEN's.

Thin over the functional core: a fused QKV projection, `jna.neighborhood_attention`, and an
output projection with dropout.
"""

from __future__ import annotations

from typing import Any, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from jna.functional import neighborhood_attention

__all__ = ["NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D"]

IntOrTuple = Union[int, Sequence[int]]
BoolOrTuple = Union[bool, Sequence[bool]]


class _NeighborhoodAttention(nn.Module):
    """Multi-head neighborhood attention over a token grid.

    Input ``x``: ``[B, *X, C]`` with ``rank`` spatial axes; output ``[B, *X, C]``.
    ``C % num_heads == 0``; each head has ``C // num_heads`` channels.

    Attributes:
      num_heads: attention heads.
      kernel_size, stride, dilation, is_causal: window parameters, an int/bool or one per axis
        (see `jna.neighborhood_attention`).
      qkv_bias: whether the fused QKV projection has a bias.
      qk_scale: logit scale; default ``head_dim ** -0.5``.
      proj_drop: dropout rate after the output projection.
      backend: jna backend (``"auto"`` by default).
      dtype: computation dtype (None: inferred from inputs and params).
      param_dtype: parameter dtype.
    """

    num_heads: int
    kernel_size: IntOrTuple
    stride: IntOrTuple = 1
    dilation: IntOrTuple = 1
    is_causal: BoolOrTuple = False
    qkv_bias: bool = True
    qk_scale: float | None = None
    proj_drop: float = 0.0
    backend: str = "auto"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    rank: int = 0  # set by the 1D/2D/3D subclasses

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        """Applies the layer.

        Args:
          x: ``[B, *X, C]``.
          deterministic: disables dropout when True; otherwise needs a ``'dropout'`` rng.

        Returns:
          ``[B, *X, C]``.
        """
        if x.ndim != self.rank + 2:
            raise ValueError(
                f"x has {x.ndim} dimensions {tuple(x.shape)}; {type(self).__name__} takes "
                f"[batch, {self.rank} spatial axes, channels]."
            )
        channels = x.shape[-1]
        if channels % self.num_heads != 0:
            raise ValueError(
                f"x's channels ({channels}) must be divisible by num_heads ({self.num_heads})."
            )
        head_dim = channels // self.num_heads
        qkv = nn.Dense(
            3 * channels, use_bias=self.qkv_bias, dtype=self.dtype, param_dtype=self.param_dtype,
            name="qkv",
        )(x)
        qkv = qkv.reshape(*x.shape[:-1], 3, self.num_heads, head_dim)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        out = neighborhood_attention(
            q, k, v, self.kernel_size, stride=self.stride, dilation=self.dilation,
            is_causal=self.is_causal, scale=self.qk_scale, backend=self.backend,
        )
        out = out.reshape(*x.shape[:-1], channels)
        out = nn.Dense(channels, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(out)
        return nn.Dropout(rate=self.proj_drop)(out, deterministic=deterministic)


class NeighborhoodAttention1D(_NeighborhoodAttention):
    """1-D neighborhood attention layer: ``[B, L, C] -> [B, L, C]``."""

    rank: int = 1


class NeighborhoodAttention2D(_NeighborhoodAttention):
    """2-D neighborhood attention layer: ``[B, X, Y, C] -> [B, X, Y, C]``."""

    rank: int = 2


class NeighborhoodAttention3D(_NeighborhoodAttention):
    """3-D neighborhood attention layer: ``[B, X, Y, Z, C] -> [B, X, Y, Z, C]``."""

    rank: int = 3
