"""Forward-mode autodiff (`jax.jvp`) through the fused kernels, with reverse mode unchanged.

JAX lets a function carry a `jax.custom_jvp` or a `jax.custom_vjp` rule, not both. jna's fused
ops therefore carry a custom JVP, and reverse mode is derived from it the way JAX derives it for
any function: linearize, then transpose the linear part. The composition, for a backend's op
``f(q, k, v) = (out, lse)`` on its kernel-layout tensors (`fused_op`):

1. ``f`` is a `jax.custom_jvp` function whose primal is the backend's existing forward (its
   `jax.custom_vjp` op). Its JVP rule runs that forward for ``(out, lse)`` and gets the tangents
   from ``tangent(q, k, v, out, lse; tq, tk, tv)``.
2. ``tangent`` is linear in ``(tq, tk, tv)``. Its primal binds `tangent_p`, a primitive whose
   evaluation is the backend's fused tangent kernel (one flash-style pass over each query's
   window: the attention weights are never written) and whose **transpose** is the backend's
   existing backward kernels (the transpose of the JVP of ``f`` is its VJP). So `jax.grad` of a
   fused op runs the forward kernel, then the dQ and dK/dV kernels, as with the custom VJP.
3. ``tangent`` is itself a `jax.custom_jvp` function, for the gradient of a loss built from a
   JVP (``grad(p -> loss(jvp(f, p, t)))``): its derivative in ``(tq, tk, tv)`` is ``tangent``
   again (linear), and its derivative in ``(q, k, v)`` is the second directional derivative of
   NA, computed by the backend's ``second_order`` (the reference backend's pure-JAX attention
   differentiated twice: exact, transposable by JAX, but it materializes each query's window:
   memory ``O(B N H prod(K))``). ``out`` and ``lse`` enter ``tangent`` as residuals; their own
   tangents are implied by those of ``(q, k, v)`` and are not used.
4. `tangent_p` batches (`jax.vmap`, `jax.jacfwd`) by folding the mapped axis into the head
   axis (heads are independent and a query head's kv head stays ``h // group``), so a batched
   call is one launch of the same kernel.

A backend opts in with `register` (its tangent kernel, backward kernels and
second-order functions); `fused_op` wraps its forward.

Extra differentiable inputs. The op may take more inputs than ``(q, k, v)``: fused-triton's op
with a relative positional bias is ``f(q, k, v, rpb)`` (``rpb`` ``[H, T]``, heads at axis -2
like the others). Everything above then runs on the ``n`` inputs: the tangent primitive takes
``(*inputs, out, lse, *tangents)``, the backward returns ``n`` cotangents and the second-order
rule takes ``(*inputs, *tangents, *directions)``. The three-input form is unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
from jax.interpreters import ad, batching, mlir


@dataclasses.dataclass(frozen=True)
class Rules:
    """What a backend provides for forward mode (all on its kernel-layout tensors).

    tangent(st, q, k, v, out, lse, tq, tk, tv) -> (tout, tlse): the fused tangent kernel.
    backward(st, (q, k, v, out, lse), (dout, dlse)) -> (dq, dk, dv): the backward kernels.
    second_order(st, q, k, v, tq, tk, tv, dq, dk, dv) -> (tout', tlse'): the derivative of the
      tangent in (q, k, v) along (dq, dk, dv), in pure JAX.
    (With ``n`` inputs, e.g. ``(q, k, v, rpb)``, each rule takes and returns ``n`` of them in the
    same places: ``tangent(st, *inputs, out, lse, *tangents)``, ``backward(st, (*inputs, out,
    lse), cts) -> n cotangents``, ``second_order(st, *inputs, *tangents, *directions)``.)
    lse_head_axis: the head axis of the backend's lse (``[BG, *tokens, H]``: -1; fused-mosaic's
      ``[BG, H, tokens]``: -2). The other operands have theirs at -2 (``[..., H, D]``).
    """

    tangent: Callable
    backward: Callable
    second_order: Callable
    lse_head_axis: int = -1


_RULES: dict[str, Rules] = {}


def with_heads(st, heads: int, kv_heads: int):
    """A backend's launch description (a frozen dataclass with ``heads``, ``kv_heads`` and
    optionally ``problem``) for a changed head count: what vmap folds into the heads runs."""
    problem = getattr(st, "problem", None)
    extra = {} if problem is None else {"problem": dataclasses.replace(problem, heads=heads, kv_heads=kv_heads)}
    return dataclasses.replace(st, heads=heads, kv_heads=kv_heads, **extra)


def register(backend: str, rules: Rules) -> None:
    _RULES[backend] = rules


# ----------------------------------------------------------------------------------------------
# The tangent primitive: evaluation by the tangent kernel, transpose by the backward kernels
# ----------------------------------------------------------------------------------------------

tangent_p = jex_core.Primitive("jna_na_tangent")
tangent_p.multiple_results = True

def _num_inputs(args) -> int:
    """``n`` for the tangent primitive's operands ``(*inputs, out, lse, *tangents)``."""
    return (len(args) - 2) // 2


def _evaluate(*args, backend, st):
    return tuple(_RULES[backend].tangent(st, *args))


tangent_p.def_impl(_evaluate)
mlir.register_lowering(tangent_p, mlir.lower_fun(_evaluate, multiple_results=True))


@tangent_p.def_abstract_eval
def _abstract(*args, backend, st):
    del backend, st
    n = _num_inputs(args)
    out, lse = args[n], args[n + 1]
    return (jax.core.ShapedArray(out.shape, out.dtype), jax.core.ShapedArray(lse.shape, jnp.float32))


def _transpose(cts, *args, backend, st):
    n = _num_inputs(args)
    residuals, linear = args[:n + 2], args[n + 2:]  # (*inputs, out, lse), the tangents
    if any(ad.is_undefined_primal(x) for x in residuals):
        raise NotImplementedError("jna: the tangent of NA is linear in the tangents only")
    out, lse = residuals[n:]
    ct_out, ct_lse = (jnp.zeros(a.shape, a.dtype) if type(c) is ad.Zero else c
                      for c, a in zip(cts, (out, lse)))
    grads = _RULES[backend].backward(st, residuals, (ct_out, ct_lse))
    return [None] * (n + 2) + [g if ad.is_undefined_primal(x) else None for g, x in zip(grads, linear)]


ad.primitive_transposes[tangent_p] = _transpose


def _fold(x, bdim, size, head_axis):
    """``x`` with its mapped axis (or a broadcast one) folded into the head axis, mapped axis
    outermost: ``[..., H, ...] -> [..., size * H, ...]``."""
    head_axis = head_axis % (x.ndim if bdim is None else x.ndim - 1)
    if bdim is None:
        x = jnp.broadcast_to(jnp.expand_dims(x, head_axis), (*x.shape[:head_axis], size, *x.shape[head_axis:]))
    else:
        x = jnp.moveaxis(x, bdim, head_axis)
    return x.reshape(*x.shape[:head_axis], size * x.shape[head_axis + 1], *x.shape[head_axis + 2:])


def _batch(args, dims, *, backend, st):
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    rules = _RULES[backend]
    n = _num_inputs(args)
    # of (*inputs, out, lse, *tangents): every operand has its heads at -2 except the lse
    heads_axis = (-2,) * (n + 1) + (rules.lse_head_axis,) + (-2,) * n
    folded = [_fold(a, d, size, h) for a, d, h in zip(args, dims, heads_axis)]
    wide = with_heads(st, st.heads * size, st.kv_heads * size)
    tout, tlse = tangent_p.bind(*folded, backend=backend, st=wide)
    unfold = lambda x, h: x.reshape(*x.shape[:h], size, x.shape[h] // size, *x.shape[h + 1:])
    h_out, h_lse = tout.ndim - 2, tlse.ndim + rules.lse_head_axis
    return (unfold(tout, h_out), unfold(tlse, h_lse)), (h_out, h_lse)


batching.primitive_batchers[tangent_p] = _batch


# ----------------------------------------------------------------------------------------------
# The composition
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _tangent(backend, st, *args):
    """``tangent_p`` on ``(*inputs, out, lse, *tangents)`` (e.g. q, k, v, out, lse, tq, tk, tv)."""
    return tuple(tangent_p.bind(*args, backend=backend, st=st))


@_tangent.defjvp
def _tangent_jvp(backend, st, primals, tangents):
    n = _num_inputs(primals)
    inputs, (out, lse), lin = primals[:n], primals[n:n + 2], primals[n + 2:]
    # out/lse tangents follow from the inputs' (the directions d_inputs)
    d_inputs, d_lin = tangents[:n], tangents[n + 2:]
    y = _tangent(backend, st, *primals)
    linear = _tangent(backend, st, *inputs, out, lse, *d_lin)
    second = _RULES[backend].second_order(st, *inputs, *lin, *d_inputs)
    return y, tuple(a + b.astype(a.dtype) for a, b in zip(linear, second))


def fused_op(backend: str, forward: Callable) -> Callable:
    """``op(st, q, k, v) -> (out, lse)``: ``forward(q, k, v, st)`` (a backend's `jax.custom_vjp`
    op on kernel-layout tensors) made differentiable in forward mode too (module docstring).
    With more inputs (``forward(q, k, v, rpb, st)``), ``op(st, q, k, v, rpb)``."""

    @functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
    def op(st, *inputs):
        return tuple(forward(*inputs, st))

    @op.defjvp
    def op_jvp(st, primals, tangents):
        out, lse = forward(*primals, st)
        lin = tuple(t.astype(x.dtype) for t, x in zip(tangents, primals))
        return (out, lse), _tangent(backend, st, *primals, out, lse, *lin)

    return op


# ----------------------------------------------------------------------------------------------
# Bilinear ops (the unfused backend's QK and AV): every derivative and transpose from the kernels
# ----------------------------------------------------------------------------------------------


def _batch_bilinear(prim, args, dims, *, st):
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    x, y = (_fold(a, d, size, -2) for a, d in zip(args, dims))
    out = prim.bind(x, y, st=with_heads(st, st.heads * size, st.kv_heads * size))
    h = out.ndim - 2
    return out.reshape(*out.shape[:h], size, out.shape[h] // size, *out.shape[h + 1:]), h


def bilinear_op(name: str, evaluate: Callable, lhs_transpose: Callable, rhs_transpose: Callable) -> Callable:
    """``op(x, y, st)``: a kernel op bilinear in ``(x, y)`` (``[BG, *tokens, H(_kv), ...]``,
    heads at axis -2), differentiable in every mode without a custom rule of its own.

    ``evaluate(x, y, st, linear)`` runs the kernel; with ``linear=False`` (the primal) it may add
    a constant (the unfused QK's ``-inf`` in masked slots), with ``linear=True`` it must be
    bilinear (zero there). The primal's JVP is ``lin(tx, y) + lin(x, ty)``; ``lin`` is a
    bilinear primitive whose transposes are ``lhs_transpose(ct, y, st, x_aval)`` and
    ``rhs_transpose(ct, x, st, y_aval)`` (the backward kernels), so reverse mode, forward mode and
    their compositions (second order included) all run the kernels. vmap folds into the heads.
    """
    primal_p, linear_p = jex_core.Primitive(name), jex_core.Primitive(name + "_linear")
    for prim, linear in ((primal_p, False), (linear_p, True)):
        run = functools.partial(lambda x, y, *, st, linear: evaluate(x, y, st, linear), linear=linear)
        prim.def_impl(run)
        mlir.register_lowering(prim, mlir.lower_fun(run, multiple_results=False))
        prim.def_abstract_eval(functools.partial(
            lambda x, y, *, st, linear: _shaped(jax.eval_shape(
                functools.partial(evaluate, st=st, linear=linear), x, y)), linear=linear))
        batching.primitive_batchers[prim] = functools.partial(_batch_bilinear, prim)

    def lhs(ct, x, y, *, st):
        return ad.Zero(x.aval) if type(ct) is ad.Zero else lhs_transpose(ct, y, st, x.aval)

    def rhs(ct, x, y, *, st):
        return ad.Zero(y.aval) if type(ct) is ad.Zero else rhs_transpose(ct, x, st, y.aval)

    ad.defbilinear(linear_p, lhs, rhs)

    def primal_jvp(primals, tangents, *, st):
        (x, y), (tx, ty) = primals, tangents
        out = primal_p.bind(x, y, st=st)
        terms = ([linear_p.bind(tx, y, st=st)] if type(tx) is not ad.Zero else []) + (
            [linear_p.bind(x, ty, st=st)] if type(ty) is not ad.Zero else [])
        return out, functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(out)

    ad.primitive_jvps[primal_p] = primal_jvp
    return lambda x, y, st: primal_p.bind(x, y, st=st)


def _shaped(struct):
    return jax.core.ShapedArray(struct.shape, struct.dtype)
