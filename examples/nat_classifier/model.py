"""A hierarchical NAT/DiNAT-style classifier built from `jna.nn.NeighborhoodAttention2D`.

Layout (NAT, Hassani et al. 2023; DiNAT's dilated blocks, Hassani & Shi 2022), scaled down::

    images [B, S, S, C_in]
      -> tokenizer: two overlapping 3x3 convs, stride 2 each      [B, S/4, S/4, D]
      -> stage 0: depths[0] blocks, D channels, num_heads[0] heads
      -> downsample: 3x3 conv stride 2 + LayerNorm                 [B, S/8, S/8, 2D]
      -> stage 1: ...                                              (and so on per stage)
      -> LayerNorm, mean over the map, Dense -> logits [B, num_classes]

Each block is pre-norm: ``x + attn(LN(x))`` then ``x + MLP(LN(x))``. The attention is
neighborhood attention with NATTEN 0.17's relative positional bias (``rel_pos_bias``); DiNAT
alternates dilation 1 (local) with a dilation that spreads the window over the whole map (sparse
global), ``dilation = max(1, L // K)`` per axis. Kernels are clamped to the map, so a stage whose
map is no larger than the kernel runs plain self-attention.

``attention="dense"`` swaps every attention layer for `DenseAttention2D`: global self-attention by
`jax.nn.dot_product_attention` (cuDNN on a GPU with ``dense_implementation="cudnn"``) with the same
parameters (``qkv``, ``proj``, and a relative positional bias ``rpb [H, 2X-1, 2Y-1]`` over the whole
map). It computes exactly what neighborhood attention with ``kernel_size`` = the map computes
(checked in ``jna_tests/test_example_nat.py``), so the two runs compare attention implementations,
not models.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

import jna
import jna.nn

__all__ = ["NATClassifier", "NATBlock", "DenseAttention2D", "block_window"]


def block_window(map_shape: Sequence[int], kernel_size: int, dilated: bool):
    """``(kernel_size, dilation)`` per axis of a block on a ``map_shape`` map: the kernel clamped
    to the map; dilation 1, or DiNAT's sparse-global ``max(1, L // K)`` when ``dilated``."""
    kernel = tuple(min(kernel_size, n) for n in map_shape)
    dilation = tuple(max(1, n // k) if dilated else 1 for n, k in zip(map_shape, kernel))
    return kernel, dilation


class DenseAttention2D(nn.Module):
    """Global multi-head self-attention over a 2-D map: ``[B, X, Y, C] -> [B, X, Y, C]``.

    The parameters of `jna.nn.NeighborhoodAttention2D` (``qkv``, ``proj``; ``rpb`` of shape
    ``[num_heads, 2X - 1, 2Y - 1]`` with ``rel_pos_bias``), so that it equals neighborhood
    attention whose window is the whole map. The bias is expanded to a dense ``[1, H, N, N]``
    with jna's own index rule (`jna.semantics.relative_position_table`), and the attention is
    `jax.nn.dot_product_attention` (``implementation``: None lets XLA choose, ``"cudnn"`` forces
    cuDNN's fused kernel on a GPU).
    """

    num_heads: int
    rel_pos_bias: bool = True
    implementation: str | None = None
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        batch, rows, cols, channels = x.shape
        heads, n = self.num_heads, rows * cols
        qkv = nn.Dense(3 * channels, dtype=self.dtype, name="qkv")(x)
        q, k, v = jnp.unstack(qkv.reshape(batch, n, 3, heads, channels // heads), axis=2)
        bias = None
        if self.rel_pos_bias:
            rpb = self.param("rpb", jna.nn.rpb_init, (heads, 2 * rows - 1, 2 * cols - 1), jnp.float32)
            params = jna.semantics.normalize_params((rows, cols), (rows, cols))
            # A window covering the map has slot j = key j (row-major), so the (query, slot)
            # table is the dense (query, key) table.
            index = jna.semantics.relative_position_table(params).reshape(n, n)
            bias = rpb.reshape(heads, -1)[:, index][None].astype(q.dtype)  # [1, H, N, N]
        out = jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=self.implementation)
        return nn.Dense(channels, dtype=self.dtype, name="proj")(out.reshape(x.shape))


class NATBlock(nn.Module):
    """Pre-norm transformer block with (dilated) neighborhood or dense attention."""

    num_heads: int
    kernel_size: tuple[int, int]
    dilation: tuple[int, int] = (1, 1)
    mlp_ratio: float = 2.0
    rel_pos_bias: bool = True
    attention: str = "na"
    backend: str = "auto"
    dense_implementation: str | None = None
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        h = nn.LayerNorm(dtype=self.dtype, name="norm1")(x)
        if self.attention == "na":
            h = jna.nn.NeighborhoodAttention2D(
                num_heads=self.num_heads, kernel_size=self.kernel_size, dilation=self.dilation,
                rel_pos_bias=self.rel_pos_bias, backend=self.backend, dtype=self.dtype, name="attn")(h)
        elif self.attention == "dense":
            h = DenseAttention2D(self.num_heads, self.rel_pos_bias, self.dense_implementation,
                                 self.dtype, name="attn")(h)
        else:
            raise ValueError(f"attention must be 'na' or 'dense', got {self.attention!r}.")
        x = x + h
        h = nn.LayerNorm(dtype=self.dtype, name="norm2")(x)
        h = nn.Dense(int(channels * self.mlp_ratio), dtype=self.dtype, name="fc1")(h)
        h = nn.Dense(channels, dtype=self.dtype, name="fc2")(nn.gelu(h))
        return x + h


class NATClassifier(nn.Module):
    """Hierarchical NAT/DiNAT classifier: ``images [B, S, S, C_in] -> logits [B, num_classes]``
    (float32). See the module docstring for the layout.

    Attributes:
      num_classes: output classes.
      embed_dim: channels of stage 0 (doubled at every later stage).
      depths: blocks per stage.
      num_heads: attention heads per stage.
      kernel_size: neighborhood size (clamped to each stage's map).
      dilated: DiNAT: every second block of a stage uses the sparse-global dilation; False: NAT
        (dilation 1 everywhere).
      mlp_ratio: hidden width of the MLPs over the channels.
      rel_pos_bias: NATTEN 0.17's relative positional bias in every attention layer.
      attention: ``"na"`` (jna) or ``"dense"`` (`DenseAttention2D`, global attention).
      backend: jna backend of the attention layers (``"auto"``: one that supports the bias).
      dense_implementation: `jax.nn.dot_product_attention`'s ``implementation`` for ``"dense"``.
      dtype: computation dtype (parameters stay float32); None: float32.
    """

    num_classes: int
    embed_dim: int = 32
    depths: Sequence[int] = (2, 2)
    num_heads: Sequence[int] = (2, 4)
    kernel_size: int = 5
    dilated: bool = True
    mlp_ratio: float = 2.0
    rel_pos_bias: bool = True
    attention: str = "na"
    backend: str = "auto"
    dense_implementation: str | None = None
    dtype: Any = None

    @nn.compact
    def __call__(self, images):
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"depths {tuple(self.depths)} and num_heads {tuple(self.num_heads)} "
                             f"must have one entry per stage.")
        x = images.astype(self.dtype or jnp.float32)
        x = nn.gelu(nn.Conv(self.embed_dim // 2, (3, 3), strides=2, dtype=self.dtype, name="embed1")(x))
        x = nn.Conv(self.embed_dim, (3, 3), strides=2, dtype=self.dtype, name="embed2")(x)
        x = nn.LayerNorm(dtype=self.dtype, name="embed_norm")(x)
        channels = self.embed_dim
        for stage, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
            if stage > 0:
                channels *= 2
                x = nn.Conv(channels, (3, 3), strides=2, dtype=self.dtype, name=f"down{stage}")(x)
                x = nn.LayerNorm(dtype=self.dtype, name=f"down{stage}_norm")(x)
            for block in range(depth):
                kernel, dilation = block_window(x.shape[1:3], self.kernel_size,
                                                self.dilated and block % 2 == 1)
                x = NATBlock(heads, kernel, dilation, self.mlp_ratio, self.rel_pos_bias,
                             self.attention, self.backend, self.dense_implementation, self.dtype,
                             name=f"stage{stage}_block{block}")(x)
        x = nn.LayerNorm(dtype=self.dtype, name="norm")(x).mean(axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=jnp.float32, name="head")(x.astype(jnp.float32))
