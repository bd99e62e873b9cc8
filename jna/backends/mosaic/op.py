"""The `fused-mosaic` backend: fused NA with Pallas' Mosaic GPU backend (Hopper), forward and
backward.

Same data flow as `jna.backends.triton.fused` (docs/fused_triton.md), built for sm90:

1. `jna._src.plan.make_plan` tiles every axis; `jna._src.plan.permute` makes every Q/KV tile one
   contiguous run of ``[B * G, tiles * tile_tokens, H, D]``.
2. Forward (`jna.backends.mosaic.forward`): one CTA per (Q tile, batch*group, head), warp
   specialized like FA3: consumer warpgroups own 64 query rows each, a producer warpgroup
   streams the visited K/V tiles with TMA into an SMEM ring; wgmma for ``Q K^T`` and ``P V``,
   online softmax in float32 registers, the elementwise mask only on partial tile pairs. The
   visit list is the product of the per-axis ranges read from the plan tables in GMEM.
3. Backward (`jna.backends.mosaic.backward`): a dQ kernel over the same visit lists and a dK/dV
   kernel over the transposed lists (GQA heads summed in the kernel), both deterministic.
4. `jax.custom_vjp` around the kernels on permuted tensors (`_fused`); permutation and its
   inverse stay outside, differentiated by JAX.
5. Two forward variants, off by default (the tuner tries them; checked in the simulator and
   lowered for the GPU, not yet measured on one):
   ``MosaicConfig(direct_layout=True)``: where the tiles divide the map and there is no dilation
   (`mosaic_common.direct_ok`), the forward reads Q/K/V and writes O in place in
   ``[B, *X, H, D]`` with one TMA copy per contiguous run of the last axis (`_fused` with ``Static.direct``); its
   backward permutes and runs the kernels of 3.
   ``MosaicConfig(persistent=True)``: one CTA per SM loops over Q tiles; its producer loads the
   next tile's K/V while the consumers finish the current one.

On a machine without a GPU the kernels run in the Mosaic GPU simulator
(`plgpu.InterpretGPUParams`), slowly; tests use tiny shapes. The simulator (jax 0.11.2)
implements neither `pl.run_state` (its interpreter lets it fall through and fails with "Cannot
lower jaxpr with effects") nor wgmma with the A operand in registers ("Expected shape (6,) but
got (64, 64)": it looks A up as an SMEM allocation). FA3 uses both. Simulated
(`Static.simulated`), the kernels stage that operand through SMEM and add the product from a
fresh accumulator; on the GPU they accumulate in place from registers. Everything else (plan
lookups, TMA rings and barriers, masks, softmax, epilogues) is the same code.

Relative positional bias (``rpb=``, `supports_rpb`; non-causal, stride 1): the bias of a tile
pair depends only on the pair's tile offset, so XLA expands the ``[H, 2K_1 - 1, ...]`` table once
per call into one dense float32 block per *tile-offset class* (`jna._src.rpb_tiles`), and the
forward, dQ and dK/dV kernels load their pair's block rows from GMEM into registers and add them
to the scaled logits (Mosaic GPU has no in-register gather; the SMEM rings are full at the large
tiles). ``d_rpb``: a class-major kernel (`jna.backends.mosaic.rpb_grad`) sums ``dS`` per class,
deterministically, and XLA maps the class sums back to the table with fixed-order gathers and
sums (`rpb_tiles.tile_bias_grad`). Memory: the blocks are ``H * classes * Tq * Tk`` float32
(`RpbPlan.block_bytes`: a few MB for NAT-sized windows, hundreds of MB for 2d-flux's K = 80).
Forward mode (`jax.jvp`) with a bias is a NotImplementedError (the tangent kernel is fused-triton's,
without the bias); reverse mode runs the kernels above (`_op_rpb`).

``python -m benchmarks check-mosaic`` on a Hopper GPU checks a few shapes against the reference
backend; ``python -m benchmarks calibrate --backend fused-mosaic`` measures the launch classes.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex_core
from jax.interpreters import ad, mlir

from jna._src import plan as planning
from jna._src import compat, finite, forward_mode, resources, rpb_tiles
from jna import semantics
from jna.tuning import tables as jna_tuned
from jna._src.arguments import NAProblem
from jna.backends import device, launch, tiling
from jna.backends.launch import LaunchClass
from jna.backends.mosaic import backward as mosaic_backward
from jna.backends.mosaic import backward_fused as mosaic_backward_fused
from jna.backends.mosaic import forward as mosaic_forward
from jna.backends.mosaic import rpb_grad as mosaic_rpb_grad
from jna.backends.base import Backend
from jna.backends.mosaic.common import MosaicConfig, Static, direct_ok

NAME = "fused-mosaic"

_HEAD_DIMS = (32, 64, 128, 256)
# Above this head dim only 64-token tiles fit (SMEM and registers): `_check_config`.
_WIDE_HEAD_DIM = 128
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


# ----------------------------------------------------------------------------------------------
# Availability and configuration
# ----------------------------------------------------------------------------------------------


def _interpret() -> bool:
    return device.emulated()


def is_available() -> tuple[bool, str]:
    if _interpret() and _simulator_threads() < 4:
        # The simulator blocks one host-callback thread per waiting warpgroup (up to 3): with
        # fewer threads in XLA's CPU pool it deadlocks instead of failing.
        return False, (f"the Mosaic GPU simulator on CPU needs >= 4 host threads; this process "
                       f"has NPROC={_simulator_threads()} (set NPROC=8 before starting Python)")
    return device.gpu_availability(9.0, 10.0, "an NVIDIA Hopper GPU (sm90, wgmma)",
                                   "Mosaic GPU simulator on CPU")


def _simulator_threads() -> int:
    return int(os.environ.get("NPROC", os.cpu_count() or 1))


def runs_natively() -> bool:
    return is_available()[0] and not _interpret()


def unsupported_reason(problem: NAProblem) -> str | None:
    if jnp.dtype(problem.dtype) not in _DTYPES:
        return f"dtype {jnp.dtype(problem.dtype).name} (fused-mosaic takes bfloat16/float16)"
    if problem.head_dim not in _HEAD_DIMS:
        return f"head_dim {problem.head_dim} (fused-mosaic takes {_HEAD_DIMS})"
    if problem.value_dim != problem.head_dim:
        return f"value_dim {problem.value_dim} != head_dim {problem.head_dim}"
    if problem.scale <= 0:  # the softmax folds the scale into an FMA after the row max
        return f"scale {problem.scale} (fused-mosaic needs scale > 0)"
    return None


@functools.lru_cache(maxsize=1)
def _config_file() -> dict:
    return resources.read_json("fused_mosaic.json")


@functools.lru_cache(maxsize=1)
def launch_classes() -> tuple[LaunchClass, ...]:
    """The launch classes of ``configs/fused_mosaic.json`` (launch parameter: ``num_stages``)."""
    return launch.load("fused_mosaic.json")


def auto_declines(problem: NAProblem) -> str | None:
    """Why ``backend="auto"`` should take the next backend although this one supports the call
    (measured slower there), or None. An explicit ``backend="fused-mosaic"`` still runs it."""
    floor = _config_file().get("auto_min_head_dim", 0)
    if problem.head_dim < floor:
        return f"head_dim {problem.head_dim} < {floor}: fused-triton measured faster"
    # Small windows (issue 16): which fused backend wins there depends on the problem (H200:
    # fused-triton on the 1-D and most 2-D paper sweeps, fused-mosaic on 2-D K=3 and 3-D K=7),
    # so the tuner's measurements of both decide where they exist.
    return jna_tuned.measured_slower(NAME, "fused-triton", problem.params,
                                     max(problem.head_dim, problem.value_dim),
                                     jnp.dtype(problem.dtype).name)


@functools.lru_cache(maxsize=1024)
def _choose(params: semantics.NAParams, dim: int, tuned_speeds: tuple = ()) -> MosaicConfig:
    """Best class of head dim ``dim``'s bucket and tiles by ``tile efficiency x speed``;
    ``tuned_speeds`` (from `jna.tuning.tables`) replace the calibrated speeds and restrict the
    choice to the classes the tuner measured."""
    speeds = {c: c.speed for c in launch.for_head_dim(launch_classes(), dim)}
    if tuned_speeds:
        measured = dict(tuned_speeds)
        tuned = {c: measured[c.key] for c in speeds if c.key in measured}
        speeds = tuned or speeds
    best = tiling.choose_tiles(params, [(c.q_tokens, c.kv_tokens, speed, c) for c, speed in speeds.items()])
    if best is None:  # the whole padded map holds fewer than 64 tokens: one 64-token tile
        tile = tiling.fit_tile(tuple(tiling.axis_caps(params)), params, min_tokens=64)
        return MosaicConfig(tile, tile, 2)
    c, q_tile, kv_tile = best
    return MosaicConfig(q_tile, kv_tile, c.param("num_stages"))


def config_from_dict(fields: dict) -> MosaicConfig:
    """A `MosaicConfig` from its fields as stored in JSON (lists for the tiles)."""
    return MosaicConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def config_source(problem: NAProblem) -> str:
    """Where `default_config` takes this problem's config from (`tiling.config_source`)."""
    return tiling.config_source(NAME, problem.params, problem.head_dim,
                                jnp.dtype(problem.dtype).name, tuned_speeds=True)


def default_config(problem: NAProblem) -> MosaicConfig:
    """The config for ``problem``: this device's tuned config for exactly this problem
    (`jna.tuning.tables`), else the class and tiles that maximize ``tile efficiency * speed`` (speeds
    tuned on this device for the problem's rank, head dim and dtype if the table has them, else
    `launch_classes`). An explicit config is given through `FusedMosaic(config)` instead."""
    dtype = jnp.dtype(problem.dtype).name
    found = jna_tuned.exact(NAME, problem.params, problem.head_dim, dtype)
    if found is not None:
        return config_from_dict(found)
    return _choose(problem.params, problem.head_dim,
                   jna_tuned.class_speeds(NAME, problem.rank, problem.head_dim, dtype))


# ----------------------------------------------------------------------------------------------
# The differentiable op on permuted tensors
# ----------------------------------------------------------------------------------------------


def _permute_inputs(q, k, v, plan):
    return (planning.permute(q, plan, "q"), planning.permute(k, plan, "kv"),
            planning.permute(v, plan, "kv"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused(qp, kp, vp, st: Static):
    """``(out [BG, Nq, H, D], lse [BG, H, Nq])`` on tensors permuted by ``st.plan``.

    With ``st.direct`` the tensors are ``[B, *X, H, D]`` as passed (out too; lse stays in plan
    order): the forward kernel reads and writes them in place, and the backward permutes them
    first (its kernels read permuted tiles).
    """
    return tuple(mosaic_forward.forward_call(qp, kp, vp, st))


def _fused_fwd(qp, kp, vp, st):
    out, lse = mosaic_forward.forward_call(qp, kp, vp, st)
    return (out, lse), (qp, kp, vp, out, lse)


def _fused_bwd(st, residuals, cotangents, rpb=None, rpb_grad=True):
    """``(dq, dk, dv)``, and ``d_rpb`` (rpb's shape and dtype) when ``rpb`` is given and
    ``rpb_grad``; ``rpb``: the bias the forward added (``st.rpb`` is set then)."""
    qp, kp, vp, out, lse = residuals
    dout, dlse = cotangents
    if st.direct:
        plan = st.plan
        permuted, pullback = jax.vjp(functools.partial(_permute_inputs, plan=plan), qp, kp, vp)
        grads = _fused_bwd(dataclasses.replace(st, direct=False),
                           (*permuted, planning.permute(out, plan, "q"), lse),
                           (planning.permute(dout, plan, "q"), dlse), rpb, rpb_grad)
        return (*pullback(tuple(grads[:3])), *grads[3:])
    # d lse_i / d s_ij = P_ij, so an lse cotangent enters as a shift of delta.
    delta = jnp.einsum("bnhd,bnhd->bhn", out.astype(jnp.float32), dout.astype(jnp.float32)) - dlse
    dout = dout.astype(qp.dtype)
    bias = bias_t = None
    if rpb is not None:  # the class blocks, and transposed for the KV-tile-major kernels
        bias = _bias_blocks(rpb, st)
        bias_t = jnp.swapaxes(bias, 2, 3)
    if st.config.backward == "fused":
        grads = mosaic_backward_fused.dqkv_call(qp, kp, vp, dout, lse, delta, st, bias_t)
    else:
        dq = mosaic_backward.dq_call(qp, kp, vp, dout, lse, delta, st, bias)
        dk, dv = mosaic_backward.dkv_call(qp, kp, vp, dout, lse, delta, st, bias_t)
        grads = (dq, dk, dv)
    if rpb is None or not rpb_grad:
        return tuple(grads)
    d_blocks = mosaic_rpb_grad.drpb_call(qp, kp, vp, dout, lse, delta, bias, st)
    return (*grads, rpb_tiles.tile_bias_grad(d_blocks, st.rpb).astype(rpb.dtype))


_fused.defvjp(_fused_fwd, _fused_bwd)


# ----------------------------------------------------------------------------------------------
# Forward mode (`jna._src.forward_mode`): fused-triton's tangent kernel on this backend's plan
# (Triton runs on Hopper too); reverse mode stays on the Mosaic backward kernels above.
# ----------------------------------------------------------------------------------------------


def _triton_static(st: Static):
    """fused-triton's launch description for the same plan, permuted layout."""
    from jna.backends.triton import fused as fused_triton

    cfg = st.config
    warps = 8 if cfg.q_tokens >= 128 else 4
    config = fused_triton.TritonConfig(cfg.q_tile, cfg.kv_tile, num_warps=warps, num_stages=2,
                                       bwd_num_warps=warps, bwd_num_stages=1, direct_layout=False)
    return fused_triton._Static(plan=st.plan, heads=st.heads, kv_heads=st.kv_heads, head_dim=st.head_dim,
                                value_dim=st.head_dim, scale=st.scale, dtype=st.dtype, config=config,
                                interpret=st.simulated, layout=fused_triton._Layout(False, st.plan),
                                problem=st.problem)


def _permuted(st: Static, *tensors):
    """``(q-like, kv-like, kv-like, q-like...)`` in the permuted layout (unchanged unless direct)."""
    kinds = ("q", "kv", "kv", "q", "kv", "kv")
    if not st.direct:
        return tensors
    return tuple(planning.permute(x, st.plan, kind) for x, kind in zip(tensors, kinds))


def _from_triton(st: Static, tout, tlse):
    """The tangent kernel's ``(tout [BG, N, H, D], tlse [BG, N, H])`` in this backend's layout."""
    if st.direct:
        tout = planning.unpermute(tout, st.plan, "q", st.problem.spatial_shape)
    return tout, jnp.swapaxes(tlse, 1, 2)


def _tangent_rule(st: Static, q, k, v, out, lse, tq, tk, tv):
    from jna.backends.triton import tangent

    q, k, v, tq, tk, tv = _permuted(st, q, k, v, tq, tk, tv)
    (out,) = _permuted(st, out)
    return _from_triton(st, *tangent.tangent_call(q, k, v, out, jnp.swapaxes(lse, 1, 2), tq, tk, tv,
                                                  _triton_static(st)))


def _second_order(st: Static, q, k, v, tq, tk, tv, dq, dk, dv):
    from jna.backends.triton import fused as fused_triton

    q, k, v, tq, tk, tv = _permuted(st, q, k, v, tq, tk, tv)
    dq, dk, dv = _permuted(st, dq, dk, dv)
    return _from_triton(st, *fused_triton._second_order(_triton_static(st), q, k, v, tq, tk, tv, dq, dk, dv))


forward_mode.register(NAME, forward_mode.Rules(
    tangent=_tangent_rule, backward=_fused_bwd, second_order=_second_order, lse_head_axis=-2))
_op = forward_mode.fused_op(NAME, _fused)


# ----------------------------------------------------------------------------------------------
# The op with a relative positional bias. Same composition as `forward_mode.fused_op` (a custom
# JVP whose tangent is a primitive transposed into the backward kernels, so `jax.grad` runs the
# kernels), with rpb as a fourth differentiable input; evaluating the tangent itself (forward
# mode) raises, since the tangent kernel (fused-triton's) has no bias.
# ----------------------------------------------------------------------------------------------


def _bias_blocks(rpb, st: Static):
    """The class blocks ``[H, C, Tq, Tk]`` float32 of ``rpb`` in base-2 units (the kernels keep
    logits as ``s * scale * log2 e``), `rpb_tiles.tile_bias`."""
    return rpb_tiles.tile_bias(rpb, st.rpb, tiling.LOG2E)


def _rpb_forward(qp, kp, vp, rpb, st: Static):
    return tuple(mosaic_forward.forward_call(qp, kp, vp, st, _bias_blocks(rpb, st)))


_rpb_tangent_p = jex_core.Primitive("jna_mosaic_rpb_tangent")
_rpb_tangent_p.multiple_results = True
_RPB_RESIDUALS = 6  # q, k, v, rpb, out, lse; then the linear tq, tk, tv, trpb


def _rpb_tangent_unsupported(*args, st):
    del args, st
    raise NotImplementedError(
        f"backend='{NAME}' does not support forward-mode differentiation (jax.jvp, linearize, "
        f"jacfwd) of a call with rpb (relative positional bias): its tangent kernel has no bias. "
        f"Reverse mode (jax.grad, jax.vjp) is supported; for forward mode use backend='reference'.")


_rpb_tangent_p.def_impl(_rpb_tangent_unsupported)
mlir.register_lowering(_rpb_tangent_p, mlir.lower_fun(_rpb_tangent_unsupported, multiple_results=True))


@_rpb_tangent_p.def_abstract_eval
def _rpb_tangent_abstract(q, k, v, rpb, out, lse, tq, tk, tv, trpb, *, st):
    del q, k, v, rpb, tq, tk, tv, trpb, st
    return (jax.core.ShapedArray(out.shape, out.dtype), jax.core.ShapedArray(lse.shape, jnp.float32))


def _rpb_tangent_transpose(cts, q, k, v, rpb, out, lse, tq, tk, tv, trpb, *, st):
    residuals = (q, k, v, rpb, out, lse)
    if any(ad.is_undefined_primal(x) for x in residuals):
        raise NotImplementedError("jna: the tangent of NA is linear in the tangents only")
    ct_out, ct_lse = (jnp.zeros(a.shape, a.dtype) if type(c) is ad.Zero else c
                      for c, a in zip(cts, (out, lse)))
    linear = (tq, tk, tv, trpb)
    want_drpb = ad.is_undefined_primal(trpb)  # a bias that is not differentiated skips its kernel
    grads = _fused_bwd(st, (q, k, v, out, lse), (ct_out, ct_lse), rpb, rpb_grad=want_drpb)
    grads = (*grads, None) if not want_drpb else grads
    return [None] * _RPB_RESIDUALS + [g if ad.is_undefined_primal(x) else None
                                      for g, x in zip(grads, linear)]


ad.primitive_transposes[_rpb_tangent_p] = _rpb_tangent_transpose


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _op_rpb(st: Static, qp, kp, vp, rpb):
    """``(out, lse)`` as `_op`, with the relative positional bias ``rpb`` ``[H, 2K_1 - 1, ...]``
    (differentiable in reverse mode, its cotangent in its dtype)."""
    return _rpb_forward(qp, kp, vp, rpb, st)


@_op_rpb.defjvp
def _op_rpb_jvp(st, primals, tangents):
    out, lse = _rpb_forward(*primals, st)
    tangents = tuple(t.astype(x.dtype) for t, x in zip(tangents, primals))
    return (out, lse), tuple(_rpb_tangent_p.bind(*primals, out, lse, *tangents, st=st))


def _check_config(problem: NAProblem, config: MosaicConfig):
    """Rejects a config this problem cannot run with (`ValueError`, naming the field).

    Head dim 256: one 64-row Q tile, K/V ring and the O accumulator (128 float32 registers per
    thread) leave room for 64-token tiles and 2 stages only (192 KiB of SMEM); the dK/dV kernel
    splits the head dim in two halves (one CTA each) and the one-kernel backward is not built.
    """
    if len(config.q_tile) != problem.rank:
        raise ValueError(f"tile config {config} does not have {problem.rank} axes")
    if problem.head_dim > _WIDE_HEAD_DIM:
        for name, value, needed in (("q_tile tokens", config.q_tokens, 64),
                                    ("kv_tile tokens", config.kv_tokens, 64),
                                    ("num_stages", config.num_stages, 2)):
            if value != needed:
                raise ValueError(f"MosaicConfig {name} = {value} at head_dim {problem.head_dim}: "
                                 f"fused-mosaic needs {needed} there (shared memory, registers)")
        if config.backward == "fused":
            raise NotImplementedError(
                f"MosaicConfig.backward='fused' at head_dim {problem.head_dim}: the one-kernel "
                f"backward takes head dims up to {_WIDE_HEAD_DIM}; use backward='split'")


def _static(problem: NAProblem, config: MosaicConfig, simulator, rpb: bool = False) -> Static:
    """The launch description; ``rpb``: the kernels add a relative positional bias."""
    reason = unsupported_reason(problem)
    if reason is not None:
        raise NotImplementedError(f"backend='{NAME}' does not support this call: {reason}")
    _check_config(problem, config)
    plan = planning.make_plan(problem.params, config.q_tile, config.kv_tile)
    return Static(
        plan=plan,
        heads=problem.heads,
        kv_heads=problem.kv_heads,
        head_dim=problem.head_dim,
        scale=problem.scale,
        dtype=jnp.dtype(problem.dtype),
        config=config,
        simulator=simulator,
        direct=config.direct_layout and direct_ok(plan),
        ctas=_persistent_ctas(simulator) if config.persistent else 0,
        problem=problem,
        rpb=rpb_tiles.make_rpb_plan(plan) if rpb else None,
    )


def _persistent_ctas(simulator) -> int:
    """CTAs of the persistent forward: one per SM (3 in the simulator: several Q tiles each)."""
    if simulator is not None:
        return 3
    count = getattr(jax.devices()[0], "core_count", None)
    return int(count) if count else 132  # an H100 SXM / H200 has 132 SMs


def _run(q, k, v, problem: NAProblem, config: MosaicConfig, simulator=None, rpb=None):
    """Permute, the fused op, unpermute: on the GPU (``simulator`` None) or in the simulator;
    ``rpb``: None or the relative positional bias ``[H, 2K_1 - 1, ...]``."""
    st = _static(problem, config, simulator, rpb=rpb is not None)
    plan = st.plan
    spatial = problem.spatial_shape
    op = _op if rpb is None else (lambda st, q, k, v: _op_rpb(st, q, k, v, rpb))
    if st.direct:
        out, lse = op(st, q, k, v)
    else:
        out, lse = op(st, *_permute_inputs(q, k, v, plan))
        out = planning.unpermute(out, plan, "q", spatial)
    lse = planning.unpermute(jnp.swapaxes(lse, 1, 2), plan, "q", spatial)
    return out, lse


def attention(q, k, v, problem: NAProblem, config: MosaicConfig | None = None, rpb=None):
    """Fused neighborhood attention (differentiable in q, k, v, rpb and through both outputs).

    Args:
      q: ``[B, *X, H, D]``; k, v: ``[B, *X, H_kv, D]`` (bfloat16/float16, D in {32, 64, 128,
        256}; at 256 only 64-token tiles: `_check_config`).
      problem: the validated call (`jna._src.arguments.check_call`).
      config: tile config; default `default_config(problem)`.
      rpb: None or the relative positional bias ``[H, 2K_1 - 1, ..., 2K_n - 1]`` (float32 or q's
        dtype; non-causal, stride 1: `jna._src.arguments.check_rpb`), added in float32 after
        scaling; its gradient is deterministic. Reverse mode only (a jvp raises).

    Returns:
      ``(out, lse)``: ``[B, *X, H, D]`` in q's dtype and ``[B, *X, H]`` float32 (natural log).

    Non-finite values: ``P V`` sums ``0 * v`` over masked keys of a tile, so a NaN/inf value
    would leak into queries that do not see it. The kernel runs when every value is finite; if
    one is not, the call takes fused-triton's containing kernel instead (a run-time
    ``lax.cond``), so queries off a non-finite value stay exact. With ``rpb`` that is
    fused-triton if it supports the bias, else the reference backend. (A non-finite bias needs
    no switch: the kernels add the bias before the mask, so it reaches only the pairs whose
    offset it is, as in the reference.)
    """
    simulator = compat.mosaic_simulator() if _interpret() else None
    config = config or default_config(problem)
    fast = functools.partial(_run, problem=problem, config=config, simulator=simulator)
    if simulator is not None:
        return fast(q, k, v, rpb=rpb)
    if rpb is not None:
        contained = _contained_with_rpb(problem)
        return lax.cond(finite.all_finite(v), lambda q, k, v, b: fast(q, k, v, rpb=b), contained,
                        q, k, v, rpb)
    from jna.backends.triton import fused as fused_triton

    contained = functools.partial(fused_triton.attention, problem=problem)
    return lax.cond(finite.all_finite(v), fast, contained, q, k, v)


def _contained_with_rpb(problem: NAProblem):
    """``(q, k, v, rpb) -> (out, lse)`` of a backend that keeps a non-finite value inside its
    windows and adds the bias: fused-triton where it declares ``supports_rpb``, else reference."""
    from jna.backends import registry

    cls = registry.backend_class("fused-triton")
    if not cls.supports_rpb:
        cls = registry.backend_class("reference")
    backend = cls()
    return lambda q, k, v, rpb: backend.run(q, k, v, problem, rpb)


def lower_for_gpu(problem: NAProblem, config: MosaicConfig | None = None, backward: bool = False,
                  rpb: bool = False):
    """Lowers the GPU (non-simulated) kernels for ``problem`` to StableHLO for CUDA.

    Runs on any machine: Pallas lowers the kernels through Mosaic GPU (layouts, wgmma shapes,
    TMA and SMEM checks) into the custom calls it embeds; only the PTX/SASS compilation of those
    modules happens later, on a GPU. ``backward``: lower the forward and both backward kernels
    (a VJP). ``rpb``: with a float32 relative positional bias (and, with ``backward``, its
    gradient kernel). Returns the `jax.stages.Lowered`.
    """
    config = config or default_config(problem)
    shape = lambda heads, dim: jax.ShapeDtypeStruct(
        (problem.batch, *problem.spatial_shape, heads, dim), problem.dtype)
    run = functools.partial(_run, problem=problem, config=config, simulator=None)
    fn = lambda q, k, v, *bias: run(q, k, v, rpb=bias[0] if bias else None)
    if backward:
        def fn(q, k, v, *bias):
            (out, lse), vjp = jax.vjp(lambda q, k, v, *b: run(q, k, v, rpb=b[0] if b else None),
                                      q, k, v, *bias)
            return vjp((out, lse))
    args = (shape(problem.heads, problem.head_dim), shape(problem.kv_heads, problem.head_dim),
            shape(problem.kv_heads, problem.value_dim))
    if rpb:
        args += (jax.ShapeDtypeStruct((problem.heads, *(2 * k - 1 for k in problem.params.kernel_size)),
                                      jnp.float32),)
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


# ----------------------------------------------------------------------------------------------
# The backend (the contract of `jna.backends.base`)
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FusedMosaic(Backend):
    """fused-mosaic: fused NA with Mosaic GPU (Hopper sm90: TMA, wgmma, warp specialization; the
    Mosaic GPU simulator on a CPU). ``FusedMosaic(MosaicConfig(...))`` runs that config, tiles
    fitted to each call (at least one 64-row warpgroup of queries)."""

    config: MosaicConfig | None = None

    name: ClassVar[str] = NAME
    config_type: ClassVar[type] = MosaicConfig
    min_tile_tokens: ClassVar[int] = 64
    supports_rpb: ClassVar[bool] = True  # forward, backward and d_rpb in the kernels (reverse mode)

    # The module's functions, as the contract's methods (they take no instance state).
    is_available = staticmethod(is_available)
    runs_natively = staticmethod(runs_natively)
    supports = staticmethod(unsupported_reason)
    auto_declines = staticmethod(auto_declines)
    launch_config_file: ClassVar[str] = "fused_mosaic.json"
    launch_classes = staticmethod(launch_classes)
    default_config = staticmethod(default_config)
    default_config_source = staticmethod(config_source)

    def candidate_configs(self, problem: NAProblem, shapes_per_class: int = 2) -> list:
        """Every launch class with its most tile-efficient shapes, each also ``persistent`` and,
        where the tiles divide the map, in the direct (no permutation) layout."""
        out = []
        for c in launch.for_head_dim(launch_classes(), problem.head_dim):
            stages = c.param("num_stages")
            for eff, q_tile, kv_tile in tiling.ranked_tiles(problem.params, c.q_tokens, c.kv_tokens,
                                                            shapes_per_class):
                fields = c.fields
                plan = planning.make_plan(problem.params, q_tile, kv_tile)
                for direct in ([False, True] if direct_ok(plan) else [False]):
                    for persistent in (False, True):
                        flags = {k: True for k, on in (("direct_layout", direct),
                                                       ("persistent", persistent)) if on}
                        out.append((dict(fields, **flags),
                                    MosaicConfig(q_tile, kv_tile, stages, **flags), eff))
        return out

    def attention(self, q, k, v, problem: NAProblem, rpb=None):
        return attention(q, k, v, problem, self.config_for(problem), rpb)
