"""Relative positional bias (NATTEN 0.17's ``rpb``) as a dense ``[*X, H, prod(K)]`` bias.

The index rule is `jna.semantics` (`relative_position_table`); this is the jax side shared by the
unfused ops (`jna.na*d_qk`) and the unfused backend's attention. The reference backend gathers
the same indices chunk by chunk instead (`jna.backends.reference`), and fused kernels compute them
in-kernel from tile coordinates (`jna.semantics.relative_position_index_of_key`).
"""

from __future__ import annotations

import jax.numpy as jnp

from jna import semantics

__all__ = ["relative_position_bias"]


def relative_position_bias(rpb, params: semantics.NAParams):
    """The bias of every (query, window slot): ``[*X, H, prod(K)]`` float32.

    Args:
      rpb: ``[H, 2K_1 - 1, ..., 2K_n - 1]`` (validated by `jna._src.arguments.check_rpb`).
      params: the call's window parameters (non-causal, stride 1).

    Returns:
      ``bias[*x, h, j] = rpb[h, i_1, ..., i_n]`` with the per-axis indices of slot ``j`` of query
      ``x`` (`jna.semantics.relative_position_index`), in float32. Differentiable in ``rpb``: the
      gradient sums the bias's cotangent over the (query, slot) pairs of each relative offset.
    """
    heads = rpb.shape[0]
    index = semantics.relative_position_table(params)
    bias = rpb.astype(jnp.float32).reshape(heads, -1)[:, index]  # [H, *X, prod(K)]
    return jnp.moveaxis(bias, 0, -2)
