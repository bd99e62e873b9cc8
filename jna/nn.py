"""Flax linen modules: neighborhood attention layers mirroring NATTEN's.

Thin over the functional core: a fused QKV projection, `jna.neighborhood_attention`, and an
output projection with dropout. With ``rel_pos_bias=True`` the layer has NATTEN 0.17's relative
positional bias ``rpb``, passed to `jna.neighborhood_attention` (``rpb=``) on the layer's
``backend``. The computation is shared with the NNX modules of
`jna.nnx` (same weights, same outputs); `jna.natten_weights` loads NATTEN's PyTorch weights.

Parameters (``C`` channels, ``K`` the kernel size per axis)::

    {'qkv': {'kernel': [C, 3C], 'bias': [3C] (qkv_bias)},
     'proj': {'kernel': [C, C], 'bias': [C]},
     'rpb': [num_heads, 2K_1 - 1, ..., 2K_n - 1] (rel_pos_bias)}
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp
from flax.linen.linear import default_kernel_init

from jna._attention_layer import attend, check_proj_drop, rpb_init, rpb_shape

__all__ = ["NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D", "rpb_init"]

IntOrTuple = Union[int, Sequence[int]]
BoolOrTuple = Union[bool, Sequence[bool]]
Initializer = Callable[..., Any]


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
      proj_drop: dropout rate after the output projection. When > 0, the mode must be given
        through ``deterministic`` (here or at call time, as in flax's attention modules).
      rel_pos_bias: add NATTEN 0.17's relative positional bias, a parameter ``rpb`` of shape
        ``[num_heads, 2K_1 - 1, ..., 2K_n - 1]`` initialized by ``rpb_init``, added in float32 to
        the logits (`jna.neighborhood_attention`'s ``rpb``). Non-causal, stride 1 only, on a
        backend that supports it (``auto`` picks one; otherwise NotImplementedError naming
        ``rpb``).
      backend: jna backend (``"auto"`` by default).
      dtype: computation dtype (None: inferred from inputs and params).
      param_dtype: parameter dtype.
      kernel_init: initializer of both projections' kernels (flax's default: LeCun normal).
      bias_init: initializer of both projections' biases (zeros).
      rpb_init: initializer of the bias table (NATTEN's truncated normal, `rpb_init`).
      deterministic: dropout mode, if not given at call time: True disables dropout, False
        applies it (needs a ``'dropout'`` rng).
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
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()
    rpb_init: Initializer = rpb_init
    deterministic: bool | None = None

    rank: int = 0  # set by the 1D/2D/3D subclasses

    @nn.compact
    def __call__(self, x, deterministic: bool | None = None):
        """Applies the layer.

        Args:
          x: ``[B, *X, C]``.
          deterministic: dropout mode (see the attribute); exactly one of the attribute and this
            argument must be given when ``proj_drop > 0`` (flax's `merge_param`), neither is
            needed otherwise.

        Returns:
          ``[B, *X, C]``.
        """
        check_proj_drop(self.proj_drop)
        dense = lambda features, use_bias, name: nn.Dense(
            features, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=self.kernel_init, bias_init=self.bias_init, name=name)
        channels = x.shape[-1]
        rpb = None
        if self.rel_pos_bias:
            rpb = self.param("rpb", self.rpb_init, rpb_shape(self.num_heads, self.kernel_size, self.rank),
                             self.param_dtype)
        out = attend(self, x, dense(3 * channels, self.qkv_bias, "qkv"), dense(channels, True, "proj"),
                     rpb)
        if self.proj_drop > 0:  # as flax's attention: the mode is required only with dropout
            deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
            out = nn.Dropout(rate=self.proj_drop)(out, deterministic=deterministic)
        return out


class NeighborhoodAttention1D(_NeighborhoodAttention):
    """1-D neighborhood attention layer: ``[B, L, C] -> [B, L, C]``."""

    rank: int = 1


class NeighborhoodAttention2D(_NeighborhoodAttention):
    """2-D neighborhood attention layer: ``[B, X, Y, C] -> [B, X, Y, C]``."""

    rank: int = 2


class NeighborhoodAttention3D(_NeighborhoodAttention):
    """3-D neighborhood attention layer: ``[B, X, Y, Z, C] -> [B, X, Y, Z, C]``."""

    rank: int = 3
