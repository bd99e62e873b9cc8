"""Flax NNX modules: neighborhood attention layers mirroring NATTEN's (and `jna.nn`'s).

The same layer as the linen modules of `jna.nn`, with the same fields and numerics (the
computation is shared, `jna._attention_layer.attend`); the parameters live on the module::

    layer.qkv.kernel [C, 3C], layer.qkv.bias [3C] (qkv_bias; else None)
    layer.proj.kernel [C, C], layer.proj.bias [C]
    layer.rpb [num_heads, 2K_1 - 1, ..., 2K_n - 1] (rel_pos_bias; else None)

Example::

    layer = jna.nnx.NeighborhoodAttention2D(num_heads=4, in_features=64, kernel_size=7,
                                            proj_drop=0.1, rngs=nnx.Rngs(0))
    y = layer(x, deterministic=False)      # x, y: [B, X, Y, 64]; dropout from the stored rngs
    layer.eval(); y = layer(x)              # or nnx.view(layer, deterministic=True)

`jna.natten_weights.load_natten_into_nnx` loads NATTEN's PyTorch weights into these modules.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import jax.numpy as jnp
from flax import nnx
from flax.nnx.module import first_from
from flax.nnx.nn.linear import default_kernel_init

from jna._attention_layer import attend, check_heads, check_proj_drop, rpb_init, rpb_shape

__all__ = ["NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D"]

IntOrTuple = Union[int, Sequence[int]]
BoolOrTuple = Union[bool, Sequence[bool]]
Initializer = Callable[..., Any]


class _NeighborhoodAttention(nnx.Module):
    """Multi-head neighborhood attention over a token grid.

    Input ``x``: ``[B, *X, in_features]`` with ``rank`` spatial axes; output of the same shape.
    ``in_features % num_heads == 0``; each head has ``in_features // num_heads`` channels.

    Args:
      num_heads: attention heads.
      in_features: channels ``C`` of the input (and output).
      kernel_size, stride, dilation, is_causal: window parameters, an int/bool or one per axis
        (see `jna.neighborhood_attention`).
      qkv_bias: whether the fused QKV projection has a bias.
      qk_scale: logit scale; default ``head_dim ** -0.5``.
      proj_drop: dropout rate after the output projection. When > 0, the mode must be given
        through ``deterministic`` (here, at call time, ``.train()``/``.eval()`` or `nnx.view`;
        as `flax.nnx.MultiHeadAttention`).
      rel_pos_bias: add NATTEN 0.17's relative positional bias, a parameter ``rpb`` of shape
        ``[num_heads, 2K_1 - 1, ..., 2K_n - 1]`` initialized by ``rpb_init``, added in float32 to
        the logits (`jna.neighborhood_attention`'s ``rpb``). Non-causal, stride 1 only, on a
        backend that supports it (``auto`` picks one; otherwise NotImplementedError naming
        ``rpb`` at call time).
      backend: jna backend (``"auto"`` by default).
      dtype: computation dtype (None: inferred from inputs and params).
      param_dtype: parameter dtype.
      kernel_init: initializer of both projections' kernels (flax's default: LeCun normal).
      bias_init: initializer of both projections' biases (zeros).
      deterministic: dropout mode, if not given at call time: True disables dropout, False
        applies it (with the stored or the call's rngs). A call-time value takes precedence.
      rpb_init: initializer of the bias table (NATTEN's truncated normal, `jna.nn.rpb_init`).
      keep_rngs: keep a fork of ``rngs``' ``dropout`` stream (its ``default`` if none) for
        dropout; if False, pass ``rngs`` at call time to apply dropout.
      rngs: parameter initialization (and, see ``keep_rngs``, dropout) randomness.
    """

    rank: int = 0  # set by the 1D/2D/3D subclasses

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        kernel_size: IntOrTuple,
        stride: IntOrTuple = 1,
        dilation: IntOrTuple = 1,
        is_causal: BoolOrTuple = False,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        proj_drop: float = 0.0,
        rel_pos_bias: bool = False,
        backend: str = "auto",
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = nnx.initializers.zeros_init(),
        deterministic: bool | None = None,
        *,
        rpb_init: Initializer = rpb_init,
        keep_rngs: bool = True,
        rngs: nnx.Rngs,
    ):
        check_heads(in_features, num_heads, "in_features")
        check_proj_drop(proj_drop)
        self.num_heads = num_heads
        self.in_features = in_features
        # Per-axis values as tuples: NNX would treat a list attribute as a pytree node.
        self.kernel_size, self.stride, self.dilation, self.is_causal = (
            tuple(a) if isinstance(a, list) else a for a in (kernel_size, stride, dilation, is_causal))
        self.qkv_bias = qkv_bias
        self.qk_scale = qk_scale
        self.proj_drop = proj_drop
        self.rel_pos_bias = rel_pos_bias
        self.backend = backend
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.deterministic = deterministic

        def linear(out_features, use_bias):
            return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype,
                              param_dtype=param_dtype, kernel_init=kernel_init,
                              bias_init=bias_init, rngs=rngs)

        self.qkv = linear(3 * in_features, qkv_bias)
        self.proj = linear(in_features, True)
        self.rpb: nnx.Param | None = nnx.data(None)
        if rel_pos_bias:
            shape = rpb_shape(num_heads, kernel_size, self.rank)
            self.rpb = nnx.Param(rpb_init(rngs.params(), shape, param_dtype))
        # The layer resolves the mode itself (below) and hands it to Dropout explicitly.
        self.dropout = nnx.Dropout(proj_drop, rngs=rngs if keep_rngs and proj_drop > 0 else None)

    def __call__(self, x, deterministic: bool | None = None, *, rngs: nnx.Rngs | None = None):
        """Applies the layer.

        Args:
          x: ``[B, *X, in_features]``.
          deterministic: dropout mode; takes precedence over the attribute. With
            ``proj_drop > 0`` one of the two must be given (ValueError otherwise); with
            ``proj_drop == 0`` neither is needed.
          rngs: dropout randomness (an `nnx.Rngs`, `nnx.RngStream` or key); takes precedence over
            the stored one.

        Returns:
          ``[B, *X, in_features]``.
        """
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"x has {x.shape[-1]} channels (shape {tuple(x.shape)}), but "
                f"{type(self).__name__} was built with in_features={self.in_features}."
            )
        rpb = None if self.rpb is None else self.rpb[...]
        out = attend(self, x, self.qkv, self.proj, rpb)
        if self.proj_drop > 0:  # as flax's attention: the mode is required only with dropout
            deterministic = first_from(
                deterministic, self.deterministic,
                error_msg=(
                    f"{type(self).__name__} has proj_drop={self.proj_drop} but no `deterministic` "
                    "was given: pass deterministic=True/False to the constructor or the call, "
                    "or set it with .train()/.eval() or nnx.view(module, deterministic=...)."
                ),
            )
            out = self.dropout(out, deterministic=deterministic, rngs=rngs)
        return out

    def set_view(self, deterministic: bool | None = None):
        """Used by `nnx.view`: sets the dropout mode when given."""
        if deterministic is not None:
            self.deterministic = deterministic


class NeighborhoodAttention1D(_NeighborhoodAttention):
    """1-D neighborhood attention layer: ``[B, L, C] -> [B, L, C]``."""

    rank: int = 1


class NeighborhoodAttention2D(_NeighborhoodAttention):
    """2-D neighborhood attention layer: ``[B, X, Y, C] -> [B, X, Y, C]``."""

    rank: int = 2


class NeighborhoodAttention3D(_NeighborhoodAttention):
    """3-D neighborhood attention layer: ``[B, X, Y, Z, C] -> [B, X, Y, Z, C]``."""

    rank: int = 3
