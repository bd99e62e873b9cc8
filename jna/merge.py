"""Merging attention results computed over disjoint key sets, through their logsumexp."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

__all__ = ["merge_attentions"]


def merge_attentions(outputs: Sequence[jax.Array], lses: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Combines attentions over disjoint key sets into the attention over their union.

    With ``o_i = softmax(S_i) V_i`` and ``lse_i = logsumexp(S_i)`` per query row, the attention
    over the union of the key sets is ``sum_i exp(lse_i - lse) o_i`` with
    ``lse = logsumexp_i(lse_i)``. Differentiable in every output and lse (plain jax.numpy).

    Args:
      outputs: two or more arrays ``[B, *X, H, D_v]`` of one shape and dtype.
      lses: as many float arrays ``[B, *X, H]`` (natural log).

    Returns:
      ``(out, lse)``: ``out`` ``[B, *X, H, D_v]`` in the outputs' dtype, ``lse`` ``[B, *X, H]``
      float32. Merging is done in float32.

    Raises:
      ValueError: on mismatched counts, shapes or dtypes.
    """
    outputs, lses = list(outputs), list(lses)
    if len(outputs) != len(lses):
        raise ValueError(f"merge_attentions got {len(outputs)} outputs but {len(lses)} lses.")
    if len(outputs) < 1:
        raise ValueError("merge_attentions needs at least one output.")
    shape, dtype = outputs[0].shape, outputs[0].dtype
    for i, (o, l) in enumerate(zip(outputs, lses)):
        if o.shape != shape:
            raise ValueError(f"outputs[{i}] has shape {tuple(o.shape)}, outputs[0] has {tuple(shape)}.")
        if o.dtype != dtype:
            raise ValueError(f"outputs[{i}] has dtype {o.dtype}, outputs[0] has {dtype}.")
        if l.shape != shape[:-1]:
            raise ValueError(
                f"lses[{i}] has shape {tuple(l.shape)}, expected {tuple(shape[:-1])} (outputs[{i}] "
                f"without its last axis)."
            )
    lse_stack = jnp.stack([l.astype(jnp.float32) for l in lses])  # [n, B, *X, H]
    lse_max = jnp.max(lse_stack, axis=0)
    # Rows where every part is empty (-inf) stay -inf with zero output instead of NaN.
    safe_max = jnp.where(jnp.isfinite(lse_max), lse_max, 0.0)
    weights = jnp.exp(lse_stack - safe_max)  # [n, B, *X, H]
    total = jnp.sum(weights, axis=0)
    lse = safe_max + jnp.log(total)
    weights = weights / jnp.where(total > 0, total, 1.0)
    out = sum(w[..., None] * o.astype(jnp.float32) for w, o in zip(weights, outputs))
    return out.astype(dtype), lse
