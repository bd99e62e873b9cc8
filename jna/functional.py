"""The functional API: `na1d`, `na2d`, `na3d` and `neighborhood_attention`.

Every call goes the same way: validate once (`jna._src.arguments.check_call`), pick the backend
(`jna.backends.resolve`; a relative positional bias only goes to a backend that declares
``supports_rpb``), run it, and merge in the additional keys/values through the logsumexp when
there are any.
"""

from __future__ import annotations

from typing import Literal, Protocol, Sequence, overload

import jax

from jna import backends
from jna.backends.base import Backend
from jna._src.arguments import check_call
from jna._src.dense import dense_attention
from jna.merge import merge_attentions

__all__ = ["na1d", "na2d", "na3d", "neighborhood_attention"]

IntOrTuple = int | Sequence[int]
BoolOrTuple = bool | Sequence[bool]
BackendArg = str | Backend  # a name, or a backend instance (with an explicit config)


def _neighborhood_attention(
    q, k, v, kernel_size, stride, dilation, is_causal, scale, additional_keys, additional_values,
    return_lse, backend, rpb, rank,
):
    backends.check_backend_name(backend)
    problem = check_call(
        q, k, v, kernel_size, stride, dilation, is_causal, scale, additional_keys,
        additional_values, rank, rpb=rpb,
    )
    module = backends.resolve(backend, problem)
    out, lse = module.run(q, k, v, problem, rpb)
    if problem.num_extra:
        # The additional tokens have no position on the map, hence no bias (as NATTEN).
        extra_out, extra_lse = dense_attention(q, additional_keys, additional_values, problem.scale)
        out, lse = merge_attentions([out, extra_out], [lse, extra_lse])
    return (out, lse) if return_lse else out


@overload
def neighborhood_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, kernel_size: IntOrTuple, stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False, scale: float | None = None,
    additional_keys: jax.Array | None = None, additional_values: jax.Array | None = None,
    return_lse: Literal[False] = False, backend: BackendArg = "auto", rpb: jax.Array | None = None,
) -> jax.Array: ...


@overload
def neighborhood_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, kernel_size: IntOrTuple, stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False, scale: float | None = None,
    additional_keys: jax.Array | None = None, additional_values: jax.Array | None = None, *,
    return_lse: Literal[True], backend: BackendArg = "auto", rpb: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]: ...


def neighborhood_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
    scale: float | None = None,
    additional_keys: jax.Array | None = None,
    additional_values: jax.Array | None = None,
    return_lse: bool = False,
    backend: BackendArg = "auto",
    rpb: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Neighborhood attention over a 1-D, 2-D or 3-D token grid (rank taken from ``q``).

    Each query attends the ``prod(kernel_size)`` keys of its window (docs/semantics.md,
    NATTEN 0.21 semantics), plus every additional key if given, in one softmax.

    Args:
      q: ``[B, *X, H, D]`` with 1 to 3 spatial axes ``X``; float32, float16 or bfloat16.
      k: ``[B, *X, H_kv, D]``, ``H % H_kv == 0`` (query head ``h`` uses kv head
        ``h // (H // H_kv)``: GQA/MQA).
      v: ``[B, *X, H_kv, D_v]``.
      kernel_size: window size, an int or one per spatial axis (``2 <= K``, ``K * dilation <= L``).
      stride: window stride (``1 <= s <= K``), int or per axis. ``s = K`` is blocked attention.
      dilation: int or per axis (``>= 1``).
      is_causal: bool or per axis.
      scale: logit scale; default ``D ** -0.5``.
      additional_keys: optional ``[B, N_extra, H_kv, D]`` attended by every query.
      additional_values: optional ``[B, N_extra, H_kv, D_v]``, given with ``additional_keys``.
      return_lse: also return the logsumexp of each query's logits.
      backend: ``"auto"``, a backend name (``jna.backends.KNOWN_BACKENDS``), or a backend
        instance carrying a tile config (``jna.backends.FusedTriton(TritonConfig(...))``: part of
        what ``jax.jit`` sees as static, so a changed config retraces). An explicit backend that
        cannot run the call raises instead of falling back.
      rpb: optional relative positional bias (NATTEN 0.17) ``[H, 2K_1 - 1, ..., 2K_n - 1]`` with
        ``H`` the number of *query* heads (also with GQA), float32 or q's dtype. The logit of
        query ``x`` and window key ``y`` gains ``rpb[h, (y'_1 - x'_1) + K_1 - 1, ...]`` (group
        coordinates ``x' = x // dilation``), added after scaling, in float32; lse includes it.
        The additional keys get no bias. Non-causal, stride-1 calls only (any dilation).
        Differentiable (the gradient of ``rpb`` in its dtype). ``auto`` picks a backend that
        supports it (``Backend.supports_rpb``); an explicit one without it raises.

    Returns:
      ``out`` ``[B, *X, H, D_v]`` in q's dtype, or ``(out, lse)`` with ``lse`` ``[B, *X, H]``
      float32 (natural log) when ``return_lse``.

    Raises:
      ValueError: bad arguments (naming the argument, axis and value), incl. an ``rpb`` of the
        wrong shape or dtype.
      NotImplementedError: a valid call the chosen backend does not support; ``rpb`` with
        causal masking or stride > 1.

    Under `jax.jit`, the window arguments and ``scale``/``backend``/``return_lse`` are static:
    close over them (``functools.partial``) or list them in ``static_argnames``; ``rpb`` is an
    ordinary (traced) array argument.
    """
    return _neighborhood_attention(
        q, k, v, kernel_size, stride, dilation, is_causal, scale, additional_keys,
        additional_values, return_lse, backend, rpb, rank=None,
    )


class FixedRankNA(Protocol):
    """The type of `na1d`, `na2d`, `na3d`: `neighborhood_attention` for one rank."""

    @overload
    def __call__(
        self, q: jax.Array, k: jax.Array, v: jax.Array, kernel_size: IntOrTuple,
        stride: IntOrTuple = 1, dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False,
        scale: float | None = None, additional_keys: jax.Array | None = None,
        additional_values: jax.Array | None = None, return_lse: Literal[False] = False,
        backend: BackendArg = "auto", rpb: jax.Array | None = None,
    ) -> jax.Array: ...

    @overload
    def __call__(
        self, q: jax.Array, k: jax.Array, v: jax.Array, kernel_size: IntOrTuple,
        stride: IntOrTuple = 1, dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False,
        scale: float | None = None, additional_keys: jax.Array | None = None,
        additional_values: jax.Array | None = None, *, return_lse: Literal[True],
        backend: BackendArg = "auto", rpb: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]: ...

    def __call__(self, *args, **kwargs) -> jax.Array | tuple[jax.Array, jax.Array]: ...


def _fixed_rank(rank: int) -> FixedRankNA:
    def na(
        q,
        k,
        v,
        kernel_size,
        stride=1,
        dilation=1,
        is_causal=False,
        scale=None,
        additional_keys=None,
        additional_values=None,
        return_lse=False,
        backend="auto",
        rpb=None,
    ):
        return _neighborhood_attention(
            q, k, v, kernel_size, stride, dilation, is_causal, scale, additional_keys,
            additional_values, return_lse, backend, rpb, rank=rank,
        )

    axes = {1: "L", 2: "X, Y", 3: "X, Y, Z"}[rank]
    na.__name__ = na.__qualname__ = f"na{rank}d"
    na.__doc__ = (
        f"{rank}-D neighborhood attention: q ``[B, {axes}, H, D]``, k ``[B, {axes}, H_kv, D]``, "
        f"v ``[B, {axes}, H_kv, D_v]`` -> ``[B, {axes}, H, D_v]`` (and lse ``[B, {axes}, H]``); "
        f"optional relative positional bias ``rpb [H, {', '.join(['2K-1'] * rank)}]``.\n\n"
        f"Per-axis arguments take an int/bool or a tuple of {rank}. Everything else as in "
        f"`jna.neighborhood_attention`, whose docstring lists the arguments, returns and errors."
    )
    return na


na1d: FixedRankNA = _fixed_rank(1)
na2d: FixedRankNA = _fixed_rank(2)
na3d: FixedRankNA = _fixed_rank(3)
