"""jna: neighborhood attention for JAX.

Public API:
  na1d, na2d, na3d, neighborhood_attention: fused neighborhood attention (forward and backward).
  merge_attentions: combine attentions over disjoint key sets through their logsumexp.
  NeighborhoodAttention1D/2D/3D: Flax linen modules (jna.nn); the Flax NNX ones are in jna.nnx;
    jna.natten_weights loads NATTEN's PyTorch module weights into either.
  explain: which backend and tile config a call runs with, and why.
  na1d_qk/na2d_qk/na3d_qk, na1d_av/na2d_av/na3d_av: unfused ops exposing the attention logits
    (with optional relative positional bias) and applying weights (jna.qk_av).
  semantics: the exact window rules (NATTEN 0.21), usable on host and in kernels.
  sharding: the same ops over a device mesh (batch/head parallel, spatial halo exchange or
    Ulysses all-to-all).
"""

from jna._src import compat  # noqa: F401  (first: warns when jax is outside the supported range)
from jna import natten_weights, nnx, semantics, sharding
from jna.backends import KNOWN_BACKENDS, built_backends
from jna.explain import explain
from jna.functional import na1d, na2d, na3d, neighborhood_attention
from jna.merge import merge_attentions
from jna.qk_av import (
    na1d_av,
    na1d_qk,
    na2d_av,
    na2d_qk,
    na3d_av,
    na3d_qk,
    neighborhood_attention_av,
    neighborhood_attention_qk,
)
from jna.nn import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D

__version__ = "0.1.0"

__all__ = [
    "na1d",
    "na2d",
    "na3d",
    "neighborhood_attention",
    "merge_attentions",
    "na1d_qk",
    "na2d_qk",
    "na3d_qk",
    "na1d_av",
    "na2d_av",
    "na3d_av",
    "neighborhood_attention_qk",
    "neighborhood_attention_av",
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
    "explain",
    "nnx",
    "natten_weights",
    "semantics",
    "sharding",
    "KNOWN_BACKENDS",
    "built_backends",
]
