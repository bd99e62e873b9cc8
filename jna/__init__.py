"""jna: neighborhood attention for JAX.

Public API:
  na1d, na2d, na3d, neighborhood_attention: fused neighborhood attention (forward and backward).
  merge_attentions: combine attentions over disjoint key sets through their logsumexp.
  NeighborhoodAttention1D/2D/3D: Flax linen modules (jna.nn).
  semantics: the exact window rules (NATTEN 0.21), usable on host and in kernels.
  sharding: the same ops over a device mesh (batch/head parallel, spatial halo exchange).
"""

from jna import semantics, sharding
from jna.backends import KNOWN_BACKENDS, built_backends
from jna.functional import na1d, na2d, na3d, neighborhood_attention
from jna.merge import merge_attentions
from jna.nn import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D

__version__ = "0.1.0"

__all__ = [
    "na1d",
    "na2d",
    "na3d",
    "neighborhood_attention",
    "merge_attentions",
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
    "semantics",
    "sharding",
    "KNOWN_BACKENDS",
    "built_backends",
]
