"""Plain (unmasked) attention of every query over a small set of extra tokens.

Used for ``additional_keys/values``: their result is merged with the neighborhood part through
the logsumexp (`jna.merge_attentions`). The extra set is small (registers, text tokens), so a
dense ``[N, N_extra]`` logits array is fine here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["dense_attention"]


def dense_attention(q, k, v, scale: float):
    """Attention of every query over all of ``k``/``v``, float32 accumulation.

    Args:
      q: ``[B, *X, H, D]``.
      k: ``[B, M, H_kv, D]``; v: ``[B, M, H_kv, D_v]``; ``H % H_kv == 0``.
      scale: logit scale.

    Returns:
      ``(out, lse)``: ``out`` ``[B, *X, H, D_v]`` in q's dtype; ``lse`` ``[B, *X, H]`` float32.
    """
    batch, spatial, heads, head_dim = q.shape[0], q.shape[1:-2], q.shape[-2], q.shape[-1]
    kv_heads = k.shape[-2]
    group = heads // kv_heads
    qg = q.reshape(batch, -1, kv_heads, group, head_dim).astype(jnp.float32) * scale
    logits = jnp.einsum(
        "bnhgd,bmhd->bnhgm", qg, k.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    lse = jax.nn.logsumexp(logits, axis=-1)
    probs = jnp.exp(logits - lse[..., None])
    out = jnp.einsum(
        "bnhgm,bmhd->bnhgd", probs, v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    out = out.reshape(batch, *spatial, heads, v.shape[-1]).astype(q.dtype)
    return out, lse.reshape(batch, *spatial, heads)
