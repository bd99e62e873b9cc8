"""Flax linen modules: neighborhood attention layers mirroring NATTEN's.

Thin over the functional core: a fused QKV projection, `jna.neighborhood_attention`, and an
output projection with dropout. With ``rel_pos_bias=True`` the layer has NATTEN 0.17's relative
positional bias ``rpb`` and attends through the unfused ops instead (`jna.unfused`: logits with
bias -> float32 softmax -> weighted sum).
"""

from __future__ import annotations

from typing import Any, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from jna import semantics
from jna.functional import neighborhood_attention
from jna.unfused import neighborhood_attention_av, neighborhood_attention_qk

__all__ = ["NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D", "rpb_init"]


def rpb_init(key, shape, dtype=jnp.float32):
    """NATTEN 0.17's bias init: ``trunc_normal_(rpb, std=.02, mean=0., a=-2., b=2.)``.

    A normal of standard deviation 0.02 truncated to the absolute interval ``[-2, 2]``
    (100 standard deviations, as in torch's ``trunc_normal_``).
    """
    std = 0.02
    return (std * jax.random.truncated_normal(key, -2.0 / std, 2.0 / std, shape, jnp.float32)).astype(dtype)

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
      rel_pos_bias: add NATTEN 0.17's relative positional bias, a parameter ``rpb`` of shape
        ``[num_heads, 2K_1 - 1, ..., 2K_n - 1]`` initialized by `rpb_init`; the layer then runs
        the unfused ops (`jna.unfused`) and ignores ``backend``. Non-causal, stride 1 only
        (otherwise NotImplementedError).
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
    rel_pos_bias: bool = False
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
        if self.rel_pos_bias:
            kernel_size = semantics.normalize_per_axis("kernel_size", self.kernel_size, self.rank, int)
            rpb = self.param("rpb", rpb_init, (self.num_heads, *(2 * k - 1 for k in kernel_size)),
                             self.param_dtype)
            window = dict(kernel_size=self.kernel_size, stride=self.stride, dilation=self.dilation,
                          is_causal=self.is_causal)
            logits = neighborhood_attention_qk(q, k, **window, rpb=rpb, scale=self.qk_scale)
            attn = jax.nn.softmax(logits, axis=-1)  # float32
            out = neighborhood_attention_av(attn, v, **window)
        else:
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
