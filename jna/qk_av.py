"""Unfused neighborhood attention ops: logits (QK, with relative positional bias) and AV.

``na*d_qk`` returns every query's attention logits over its window, ``[B, *X, H, prod(K)]``
(slot ``j`` = the ``j``-th key of the window in row-major window order, as in NATTEN); softmax
them (or apply any score function) and pass the weights to ``na*d_av``. Both are
differentiable (q, k, rpb; attn, v) and run the GEMM-based Pallas kernels of
`jna.backends.triton.unfused` (interpret mode on a CPU-only machine).

    logits = jna.na2d_qk(q, k, kernel_size=7, rpb=rpb)      # [B, X, Y, H, 49] float32
    attn = jax.nn.softmax(logits, axis=-1)
    out = jna.na2d_av(attn, v, kernel_size=7)               # [B, X, Y, H, D_v]

Relative positional bias (NATTEN 0.17): ``rpb: [H, 2K_1 - 1, ..., 2K_n - 1]``; the logit of
query ``x`` and key ``y`` gains ``rpb[h, (y'_1 - x'_1) + K_1 - 1, ...]`` (group coordinates,
`jna.semantics.relative_position_index`). Non-causal, stride-1 calls only.
"""

from __future__ import annotations

from typing import Callable

import jax

from jna import backends
from jna._src.arguments import check_av_call, check_qk_call, check_rpb
from jna._src.rpb import relative_position_bias
from jna.functional import BoolOrTuple, IntOrTuple

__all__ = [
    "na1d_qk", "na2d_qk", "na3d_qk", "na1d_av", "na2d_av", "na3d_av",
    "neighborhood_attention_qk", "neighborhood_attention_av", "relative_position_bias",
]

_BACKEND = "unfused"


def neighborhood_attention_qk(q: jax.Array, k: jax.Array, kernel_size: IntOrTuple,
                              stride: IntOrTuple = 1, dilation: IntOrTuple = 1,
                              is_causal: BoolOrTuple = False, rpb: jax.Array | None = None,
                              scale: float | None = None) -> jax.Array:
    """Attention logits of each query over its window (rank from ``q.ndim - 3``).

    Args:
      q: ``[B, *X, H, D]`` (float32, float16 or bfloat16).
      k: ``[B, *X, H_kv, D]``, ``H % H_kv == 0`` (GQA/MQA).
      kernel_size, stride, dilation, is_causal: as in `jna.neighborhood_attention`.
      rpb: optional relative positional bias ``[H, 2K_1 - 1, ..., 2K_n - 1]`` (non-causal,
        stride 1).
      scale: logit scale; default ``D ** -0.5``. The bias is added after scaling.

    Returns:
      ``[B, *X, H, prod(K)]`` float32: ``scale * q . k (+ bias)`` per window slot, row-major
      window order; masked (causal) slots are ``-inf``.

    Raises:
      ValueError: bad arguments (naming the argument, axis and value), incl. a bad rpb shape.
      NotImplementedError: rpb with causal masking or stride > 1; no GPU/CPU to run the kernels.
    """
    return _qk(q, k, kernel_size, stride, dilation, is_causal, rpb, scale, rank=None)


def neighborhood_attention_av(attn: jax.Array, v: jax.Array, kernel_size: IntOrTuple,
                              stride: IntOrTuple = 1, dilation: IntOrTuple = 1,
                              is_causal: BoolOrTuple = False) -> jax.Array:
    """Weighted sum of each query's window values (rank from ``attn.ndim - 3``).

    Args:
      attn: ``[B, *X, H, prod(K)]`` weights (float32 or v's dtype), slots as `na*d_qk` returns
        them; masked (causal) slots are ignored, whatever they hold.
      v: ``[B, *X, H_kv, D_v]``, ``H % H_kv == 0``.
      kernel_size, stride, dilation, is_causal: as in `jna.neighborhood_attention`.

    Returns:
      ``[B, *X, H, D_v]`` in v's dtype.
    """
    return _av(attn, v, kernel_size, stride, dilation, is_causal, rank=None)


def _qk(q, k, kernel_size, stride, dilation, is_causal, rpb, scale, rank):
    problem = check_qk_call(q, k, kernel_size, stride, dilation, is_causal, scale, rank)
    if rpb is not None:
        check_rpb(rpb, problem)
    module = backends.resolve(_BACKEND, problem)
    logits = module.qk(q, k, problem)
    if rpb is not None:
        logits = logits + relative_position_bias(rpb, problem.params)
    return logits


def _av(attn, v, kernel_size, stride, dilation, is_causal, rank):
    problem = check_av_call(attn, v, kernel_size, stride, dilation, is_causal, rank)
    module = backends.resolve(_BACKEND, problem)
    return module.av(attn, v, problem)


def _fixed_rank(rank: int, op: str) -> Callable[..., jax.Array]:
    axes = {1: "L", 2: "X, Y", 3: "X, Y, Z"}[rank]
    if op == "qk":
        def fn(q, k, kernel_size, stride=1, dilation=1, is_causal=False, rpb=None, scale=None):
            return _qk(q, k, kernel_size, stride, dilation, is_causal, rpb, scale, rank=rank)

        doc = (f"{rank}-D neighborhood attention logits: q ``[B, {axes}, H, D]``, k "
               f"``[B, {axes}, H_kv, D]`` -> ``[B, {axes}, H, prod(K)]`` float32 (row-major window "
               f"slots, masked slots ``-inf``); optional ``rpb [H, {', '.join(['2K-1'] * rank)}]``.\n\n"
               f"See `jna.neighborhood_attention_qk` for the arguments, returns and errors.")
    else:
        def fn(attn, v, kernel_size, stride=1, dilation=1, is_causal=False):
            return _av(attn, v, kernel_size, stride, dilation, is_causal, rank=rank)

        doc = (f"{rank}-D neighborhood attention weighted sum: attn ``[B, {axes}, H, prod(K)]``, v "
               f"``[B, {axes}, H_kv, D_v]`` -> ``[B, {axes}, H, D_v]``.\n\n"
               f"See `jna.neighborhood_attention_av` for the arguments, returns and errors.")
    fn.__name__ = fn.__qualname__ = f"na{rank}d_{op}"
    fn.__doc__ = doc
    return fn


na1d_qk, na2d_qk, na3d_qk = (_fixed_rank(r, "qk") for r in (1, 2, 3))
na1d_av, na2d_av, na3d_av = (_fixed_rank(r, "av") for r in (1, 2, 3))
