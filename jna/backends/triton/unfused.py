"""The `unfused` backend: neighborhood attention as batched GEMMs with a neighborhood-aware epilogue.

The seed paper's design, with Pallas' Triton backend: attention weights are materialized as
``[B, *X, H, prod(K)]`` (every query's window slots in row-major window order), so they can be
inspected, biased (relative positional bias) or replaced by a custom score function.

Data flow:

1. `jna._src.plan.make_plan` tiles every axis (tile shapes from `fused_triton.default_config`) and
   lists, per Q tile, the KV tiles its windows touch, and the transpose; q/k/v are permuted so
   every tile is contiguous (`jna._src.plan.permute`), head dims padded to powers of two.
2. Three kernels, each a GEMM over the planned tile pairs, with the slot of key ``y`` for query
   ``x`` computed in-kernel from the shared window functions (`jna.semantics.window_start`):
   slot ``= ravel_a(y'_a - start_a(x'_a))`` over the window shape, valid iff ``y`` is in the
   window on every axis.

   * `_scatter_kernel` (per Q tile): ``out[x, slot(x, y)] = mult * a[x] . b[y]`` for each planned
     KV tile: ``S = A B^T`` then a masked scatter store of the in-window entries. QK forward
     (``a = q``, ``b = k``) and the attention-weight gradient of AV (``a = dO``, ``b = v``).
   * `_gather_q_kernel` (per Q tile): ``out[x] = mult * sum_y s[x, slot(x, y)] b[y]``: a masked
     gather of the tile pair's ``[Tq, Tk]`` weights from the slots, then ``P B``. AV forward
     (``s = attn``, ``b = v``) and dQ of QK (``s = dLogits``, ``b = k``).
   * `_gather_kv_kernel` (per KV tile, over the transposed plan and the query heads of a GQA
     group): ``out[y] = mult * sum_x s[x, slot(x, y)] a[x]``: ``P^T A``. dV of AV
     (``s = attn``, ``a = dO``) and dK of QK (``s = dLogits``, ``a = q``). Deterministic, no
     atomics.

3. ``attention`` (``backend="unfused"`` of `jna.na*d`): QK (+ relative positional bias, added to
   the float32 logits in the permuted layout) -> softmax in float32 -> AV, with the logsumexp of
   the logits.

Logits are float32 (accumulated in float32 whatever the input dtype; masked causal slots are
``-inf``). AV accepts float32 or half-precision weights; they are rounded to v's dtype for the
tensor-core product, as flash attention does with its probabilities.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jna._src import plan as planning
from jna._src import finite, forward_mode
from jna._src.rpb import relative_position_bias
from jna.tuning import tables as jna_tuned
from jna._src.arguments import NAProblem
from jna.backends import tiling
from jna.backends.triton import fused as fused_triton
from jna.backends.triton.common import (
    TritonBackend,
    F32_MAX as _F32_MAX,
    ONE as _ONE,
    ZERO as _ZERO,
    interpret as _interpret,
)
from jna.backends.tiling import Geometry, as_int32, ranked_tiles, ravel, unravel

NAME = "unfused"


# ----------------------------------------------------------------------------------------------
# Static description of a launch
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything static about the kernels of one problem (hashable: a primitive parameter)."""

    plan: planning.TilePlan
    heads: int
    kv_heads: int
    scale: float
    interpret: bool
    num_warps: int = 4
    num_stages: int = 2
    bwd_num_warps: int = 4
    bwd_num_stages: int = 1

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def slots(self) -> int:
        return math.prod(a.kernel_size for a in self.plan.axes)

    @property
    def has_masked_slots(self) -> bool:
        """Causal windows hold fewer than ``prod(K)`` keys: some slots stay masked."""
        return any(a.is_causal for a in self.plan.axes)


def _dot(a, b, trans_a=False, trans_b=False):
    """Product with float32 accumulation; float32-accurate for float32 operands.

    Float32 operands use three TF32 tensor-core products (Triton's ``tf32x3``: the operands split
    into high and low TF32 parts, the low x low term dropped, ~1e-6 relative error) rather than
    Triton's exact ``ieee`` dot, which runs on the CUDA cores: measured on an H200 (1d-long,
    float32) the ieee QK/AV kernels reached 1.4 TFLOP/s. Interpret mode on a CPU keeps exact
    float32 (XLA:CPU has no TF32 algorithms).
    """
    f32 = a.dtype == jnp.float32 and b.dtype == jnp.float32
    precision = None
    if f32:
        precision = (jax.lax.Precision.HIGHEST if _interpret()
                     else jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3)
    return pltriton.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


# ----------------------------------------------------------------------------------------------
# In-kernel geometry: windows, slots
# ----------------------------------------------------------------------------------------------


def _q_windows(st: _Static, geo: Geometry, qt):
    """Per axis: group coordinates ``x'`` of the Q tile's queries ([Tq]) and their windows."""
    q_local = geo.local_coords(tuple(a.q_tile for a in st.plan.axes))
    out = []
    for a, ax in enumerate(st.plan.axes):
        x = qt[a] * ax.q_tile + q_local[a]
        start, stop = geo.window(a, x)
        out.append((x, start, stop))
    return out


def _slots(st: _Static, geo: Geometry, windows, kt):
    """Slot index ``[Tq, Tk]`` (int32, clamped into range) and validity of a tile pair.

    Valid iff the query is real (not padding) and the key lies in its window on every axis.
    """
    k_local = geo.local_coords(tuple(a.kv_tile for a in st.plan.axes))
    slot, valid = None, None
    for a, ax in enumerate(st.plan.axes):
        x, start, stop = windows[a]
        y = (kt[a] * ax.kv_tile + k_local[a])[None, :]
        j = y - start[:, None]
        ok = (j >= 0) & (y < stop[:, None]) & (y < geo.lg[a]) & (x[:, None] < geo.lg_q[a])
        j = jnp.minimum(jnp.maximum(j, 0), ax.kernel_size - 1)
        slot = j if slot is None else slot * ax.kernel_size + j
        valid = ok if valid is None else valid & ok
    return slot, valid


def _ranges_total(ranges):
    return functools.reduce(lambda x, y: x * y, [c for _, c in ranges])


def _step(ranges, i, counts):
    """Step ``i`` of the product of per-axis tile ranges: per-axis tile ids and the flat id."""
    tiles = unravel(i, [c for _, c in ranges])
    tiles = [first + t for (first, _), t in zip(ranges, tiles)]
    return tiles, ravel(tiles, counts)


def _q_program(st: _Static, tab_ref):
    plan = st.plan
    geo = Geometry(plan, tab_ref, pl.program_id(1))
    qt = unravel(pl.program_id(0), [a.num_q_tiles for a in plan.axes])
    windows = _q_windows(st, geo, qt)
    ranges = [geo.kv_range(a, qt[a]) for a in range(plan.rank)]
    return geo, windows, ranges, _ranges_total(ranges)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


def _scatter_kernel(a_ref, b_ref, tab_ref, *refs, st: _Static, mult: float):
    """``out[x, slot] = mult * a[x] . b[y]`` for the in-window keys of each planned KV tile."""
    out_ref = refs[-1]  # refs[0] is the aliased initial value when there are masked slots
    plan = st.plan
    tq, tk = plan.q_tile_tokens, plan.kv_tile_tokens
    geo, windows, ranges, total = _q_program(st, tab_ref)
    nk = [a.num_kv_tiles for a in plan.axes]
    a = a_ref[...]
    rows = jnp.broadcast_to(jnp.arange(tq, dtype=jnp.int32)[:, None], (tq, tk))

    def body(i, carry):
        kt, kt_flat = _step(ranges, i, nk)
        b = b_ref[pl.ds(kt_flat * tk, tk), :]
        s = _dot(a, b, trans_b=True)
        if mult != 1.0:
            s = s * mult
        slot, valid = _slots(st, geo, windows, kt)
        # Masked-off entries get a column past the end: never written on the GPU (masked), and
        # dropped by interpret mode's scatter, whose masked entries would otherwise write back
        # stale values over a valid entry of the same (clamped) address.
        slot = jnp.where(valid, slot, st.slots)
        pltriton.store(out_ref.at[rows, slot], s.astype(out_ref.dtype), mask=valid)
        return carry

    jax.lax.fori_loop(0, total, body, 0)


def _gather_q_kernel(s_ref, b_ref, tab_ref, out_ref, *, st: _Static, mult: float,
                     contain_nonfinite: bool = False):
    """``out[x] = mult * sum_y s[x, slot(x, y)] b[y]`` over the planned KV tiles."""
    plan = st.plan
    tq, tk = plan.q_tile_tokens, plan.kv_tile_tokens
    geo, windows, ranges, total = _q_program(st, tab_ref)
    nk = [a.num_kv_tiles for a in plan.axes]
    rows = jnp.broadcast_to(jnp.arange(tq, dtype=jnp.int32)[:, None], (tq, tk))
    dim = out_ref.shape[-1]

    def body(i, carry):
        acc, poisoned = carry
        kt, kt_flat = _step(ranges, i, nk)
        b = b_ref[pl.ds(kt_flat * tk, tk), :]
        slot, valid = _slots(st, geo, windows, kt)
        p = pltriton.load(s_ref.at[rows, slot], mask=valid, other=_ZERO)
        if contain_nonfinite:
            # 0 * NaN = NaN: a non-finite row of b outside a query's window would leak into its
            # output through P @ B. Zero such rows; mark the queries whose windows hold one.
            bad = jnp.max(jnp.where(jnp.abs(b.astype(jnp.float32)) <= _F32_MAX, _ZERO, _ONE), axis=1)
            b = jnp.where(bad[:, None] > 0, jnp.zeros_like(b), b)
            poisoned = jnp.maximum(poisoned, jnp.max(jnp.where(valid, bad[None, :], 0.0), axis=1))
        acc = acc + _dot(p.astype(b.dtype), b)
        return acc, poisoned

    init = (jnp.zeros((tq, dim), jnp.float32), jnp.zeros((tq,), jnp.float32))
    acc, poisoned = jax.lax.fori_loop(0, total, body, init)
    if mult != 1.0:
        acc = acc * mult
    if contain_nonfinite:
        acc = jnp.where(poisoned[:, None] > 0, jnp.nan, acc)
    out_ref[...] = acc.astype(out_ref.dtype)


def _gather_kv_kernel(s_ref, a_ref, tab_ref, out_ref, *, st: _Static, mult: float):
    """``out[y] = mult * sum_(heads of the group) sum_x s[x, slot(x, y)] a[x]`` (per KV tile)."""
    plan = st.plan
    tq, tk = plan.q_tile_tokens, plan.kv_tile_tokens
    geo = Geometry(plan, tab_ref, pl.program_id(1))
    kt = unravel(pl.program_id(0), [a.num_kv_tiles for a in plan.axes])
    ranges = [geo.q_range(a, kt[a]) for a in range(plan.rank)]
    total = _ranges_total(ranges)
    nq = [a.num_q_tiles for a in plan.axes]
    dim = out_ref.shape[-1]
    local = jnp.broadcast_to(jnp.arange(tq, dtype=jnp.int32)[:, None], (tq, tk))

    def q_tile_body(i, acc, head):
        qt, qt_flat = _step(ranges, i, nq)
        windows = _q_windows(st, geo, qt)
        slot, valid = _slots(st, geo, windows, kt)
        rows = qt_flat * tq + local
        heads = jnp.full((tq, tk), head, jnp.int32)
        p = pltriton.load(s_ref.at[rows, heads, slot], mask=valid, other=_ZERO)
        a = a_ref[pl.ds(qt_flat * tq, tq), head, :]
        return acc + _dot(p.astype(a.dtype), a, trans_a=True)

    def head_body(head, acc):
        head = as_int32(head)  # static bounds: an int64 counter under jax_enable_x64
        return jax.lax.fori_loop(0, total, functools.partial(q_tile_body, head=head), acc)

    acc = jax.lax.fori_loop(0, st.group, head_body, jnp.zeros((tk, dim), jnp.float32))
    if mult != 1.0:
        acc = acc * mult
    out_ref[...] = acc.astype(out_ref.dtype)


# ----------------------------------------------------------------------------------------------
# Launches. Operands (permuted layout): q-like [BG, Nq, H, D], kv-like [BG, Nk, H_kv, D],
# slot arrays [BG, Nq, H, prod(K)]. Grid: (tile, batch*group, head).
# ----------------------------------------------------------------------------------------------


def _tables(st: _Static):
    tables = st.plan.tables
    padded = np.zeros(pl.next_power_of_2(max(len(tables), 16)), np.int32)
    padded[: len(tables)] = tables
    return jnp.asarray(padded)


def _table_spec(tables):
    return pl.BlockSpec(tables.shape, lambda t, b, h: (0,))


def _q_tile_spec(st: _Static, width: int):
    return pl.BlockSpec((None, st.plan.q_tile_tokens, None, width), lambda t, b, h: (b, t, h, 0))


def _kv_whole_spec(st: _Static, tokens: int, width: int):
    group = st.group
    return pl.BlockSpec((None, tokens, None, width), lambda t, b, h: (b, 0, h // group, 0))


def _compiler_params(st: _Static, backward: bool):
    if backward:
        return pltriton.CompilerParams(num_warps=st.bwd_num_warps, num_stages=st.bwd_num_stages)
    return pltriton.CompilerParams(num_warps=st.num_warps, num_stages=st.num_stages)


def _scatter(a, b, st: _Static, mult: float, dtype, fill: float, backward: bool, name: str):
    """Launches `_scatter_kernel`: ``[BG, Nq, H, prod(K)]`` in ``dtype``.

    Masked slots (causal) hold ``fill``; rows of padding queries are left unspecified.
    """
    bg, nq_tokens = a.shape[0], a.shape[1]
    tables = _tables(st)
    out_shape = jax.ShapeDtypeStruct((bg, nq_tokens, st.heads, st.slots), dtype)
    in_specs = [_q_tile_spec(st, a.shape[-1]), _kv_whole_spec(st, b.shape[1], b.shape[-1]),
                _table_spec(tables)]
    args = [a, b, tables]
    aliases = {}
    if st.has_masked_slots:
        in_specs.append(_q_tile_spec(st, st.slots))
        args.append(jnp.full(out_shape.shape, fill, dtype))
        aliases = {3: 0}
    return pl.pallas_call(
        functools.partial(_scatter_kernel, st=st, mult=mult),
        grid=(st.plan.num_q_tiles, bg, st.heads),
        in_specs=in_specs,
        out_specs=_q_tile_spec(st, st.slots),
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=_compiler_params(st, backward),
        interpret=st.interpret,
        name=name,
    )(*args)


def _gather_q(s, b, st: _Static, mult: float, dtype, backward: bool, name: str,
              contain_nonfinite: bool = False):
    """Launches `_gather_q_kernel`: ``[BG, Nq, H, b.shape[-1]]`` in ``dtype``."""
    bg = s.shape[0]
    tables = _tables(st)
    width = b.shape[-1]
    return pl.pallas_call(
        functools.partial(_gather_q_kernel, st=st, mult=mult, contain_nonfinite=contain_nonfinite),
        grid=(st.plan.num_q_tiles, bg, st.heads),
        in_specs=[_q_tile_spec(st, st.slots), _kv_whole_spec(st, b.shape[1], width),
                  _table_spec(tables)],
        out_specs=_q_tile_spec(st, width),
        out_shape=jax.ShapeDtypeStruct((bg, s.shape[1], st.heads, width), dtype),
        compiler_params=_compiler_params(st, backward),
        interpret=st.interpret,
        name=name,
    )(s, b, tables)


def _gather_kv(s, a, st: _Static, mult: float, nk_tokens: int, dtype, name: str):
    """Launches `_gather_kv_kernel`: ``[BG, Nk, H_kv, a.shape[-1]]`` in ``dtype``."""
    bg, nq_tokens = s.shape[0], s.shape[1]
    tables = _tables(st)
    group, width = st.group, a.shape[-1]
    whole_q = lambda w: pl.BlockSpec((None, nq_tokens, group, w), lambda t, b, h: (b, 0, h, 0))
    return pl.pallas_call(
        functools.partial(_gather_kv_kernel, st=st, mult=mult),
        grid=(st.plan.num_kv_tiles, bg, st.kv_heads),
        in_specs=[whole_q(st.slots), whole_q(width), _table_spec(tables)],
        out_specs=pl.BlockSpec((None, st.plan.kv_tile_tokens, None, width),
                               lambda t, b, h: (b, t, h, 0)),
        out_shape=jax.ShapeDtypeStruct((bg, nk_tokens, st.kv_heads, width), dtype),
        compiler_params=_compiler_params(st, backward=True),
        interpret=st.interpret,
        name=name,
    )(s, a, tables)


# ----------------------------------------------------------------------------------------------
# Differentiable ops on the permuted layout
# ----------------------------------------------------------------------------------------------


# QK and AV are bilinear: `forward_mode.bilinear_op` derives every derivative (reverse, forward,
# second order) and vmap from the kernels below, each transpose being a backward kernel.


def _qk_evaluate(qp, kp, st: _Static, linear: bool):
    """Logits ``[BG, Nq, H, prod(K)]`` float32 (scaled) from permuted q ``[BG, Nq, H, D']`` and
    k ``[BG, Nk, H_kv, D']``; masked (causal) slots ``-inf``, or 0 in the ``linear`` variant
    (the tangent of a masked logit: the mask is a constant)."""
    return _scatter(qp, kp, st, st.scale, jnp.float32, 0.0 if linear else -jnp.inf, False, "jna_unfused_qk")


def _qk_dq(dlogits, kp, st: _Static, q_aval):
    return _gather_q(dlogits.astype(jnp.float32), kp, st, st.scale, q_aval.dtype, True, "jna_unfused_qk_dq")


def _qk_dk(dlogits, qp, st: _Static, k_aval):
    return _gather_kv(dlogits.astype(jnp.float32), qp, st, st.scale, k_aval.shape[1], k_aval.dtype,
                      "jna_unfused_qk_dk")


def _av_forward(ap, vp, st: _Static):
    """AV forward; the variant that contains non-finite values runs only if ``v`` has one."""
    launch = functools.partial(_gather_q, st=st, mult=1.0, dtype=vp.dtype, backward=False,
                               name="jna_unfused_av")
    return jax.lax.cond(
        finite.all_finite(vp),
        lambda a, v: launch(a, v),
        lambda a, v: launch(a, v, contain_nonfinite=True),
        ap, vp,
    )


def _av_dattn(dout, vp, st: _Static, a_aval):
    return _scatter(dout.astype(vp.dtype), vp, st, 1.0, a_aval.dtype, 0.0, True, "jna_unfused_av_dattn")


def _av_dv(dout, ap, st: _Static, v_aval):
    return _gather_kv(ap, dout.astype(v_aval.dtype), st, 1.0, v_aval.shape[1], v_aval.dtype, "jna_unfused_av_dv")


# ``[BG, Nq, H, prod(K)]`` logits / ``[BG, Nq, H, D_v']`` in v's dtype from weights and permuted v.
_qk_p = forward_mode.bilinear_op("jna_unfused_qk", _qk_evaluate, _qk_dq, _qk_dk)
_av_p = forward_mode.bilinear_op("jna_unfused_av", lambda ap, vp, st, linear: _av_forward(ap, vp, st),
                                 _av_dattn, _av_dv)


# ----------------------------------------------------------------------------------------------
# Entry points (unpermuted tensors)
# ----------------------------------------------------------------------------------------------


def _padded_dim(dim: int) -> int:
    return max(16, pl.next_power_of_2(dim))


def config_source(problem: NAProblem) -> str:
    """Where `default_config` takes this problem's config from (`tiling.config_source`)."""
    return tiling.config_source(NAME, problem.params,
                                max(problem.head_dim, problem.value_dim),
                                jnp.dtype(problem.dtype).name, tuned_speeds=False)


def default_config(problem: NAProblem) -> fused_triton.TritonConfig:
    """Tiles and launch parameters: this device's tuned config for exactly this problem (`jna.tuning.tables`, backend ``"unfused"``, written by
    ``python -m jna.tuning --backend unfused``); else fused-triton's chooser with its shipped
    calibration (tile efficiency x speed of the fused kernels: a proxy, these kernels were not
    calibrated as classes; fused-triton's own tuned entries are not used for them)."""
    dim = max(problem.head_dim, problem.value_dim)
    found = jna_tuned.exact(NAME, problem.params, dim, jnp.dtype(problem.dtype).name)
    if found is not None:
        return fused_triton.config_from_dict(found)
    return fused_triton._choose(problem.params, dim)


def tune_candidates(params, dim: int, shapes_per_class: int):
    """What `jna.tuning.tuner` measures for this backend: ``[(class_fields, config, efficiency)]``.

    Tile classes of 16 to 128 tokens (smaller than fused-triton's: the GEMMs here do not carry an
    online softmax, and small windows waste most of a large tile), each with its
    ``shapes_per_class`` most tile-efficient per-axis shapes, 4 warps, 2 stages.
    """
    del dim  # one launch setting for every head dim up to MAX_HEAD_DIM
    out = []
    for q_tokens, kv_tokens in TUNE_CLASSES:
        for eff, q_tile, kv_tile in ranked_tiles(params, q_tokens, kv_tokens, shapes_per_class):
            fields = {"q_tokens": q_tokens, "kv_tokens": kv_tokens, "num_warps": 4, "num_stages": 2}
            out.append((fields, fused_triton.TritonConfig(q_tile, kv_tile, 4, 2, 4, 1), eff))
    return out


# (Q tokens, KV tokens) per tile that the tuner tries.
TUNE_CLASSES = ((16, 16), (32, 16), (16, 32), (32, 32), (64, 32), (64, 64), (128, 64))


def _static(problem: NAProblem, config: fused_triton.TritonConfig | None = None) -> _Static:
    cfg = config or default_config(problem)
    plan = planning.make_plan(problem.params, cfg.q_tile, cfg.kv_tile)
    return _Static(plan=plan, heads=problem.heads, kv_heads=problem.kv_heads, scale=problem.scale,
                   interpret=_interpret(), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                   bwd_num_warps=cfg.bwd_num_warps, bwd_num_stages=cfg.bwd_num_stages)


def _unpermute_slots(x, st: _Static, problem: NAProblem):
    """``[BG, Nq, H, prod(K)]`` -> ``[B, *X, H, prod(K)]`` (padding queries dropped)."""
    return planning.unpermute(x, st.plan, "q", problem.spatial_shape)


def qk(q, k, problem: NAProblem, config: fused_triton.TritonConfig | None = None):
    """Neighborhood attention logits (``scale * q . k`` per window slot).

    Args:
      q: ``[B, *X, H, D]``; k: ``[B, *X, H_kv, D]``.
      problem: the validated call (`jna._src.arguments.check_qk_call`).

    Returns:
      ``[B, *X, H, prod(K)]`` float32, slots in row-major window order; masked (causal) slots
      are ``-inf``. Differentiable in q and k.
    """
    st = _static(problem, config)
    dim = _padded_dim(problem.head_dim)
    qp = planning.permute(q, st.plan, "q", dim)
    kp = planning.permute(k, st.plan, "kv", dim)
    return _unpermute_slots(_qk_p(qp, kp, st), st, problem)


def av(attn, v, problem: NAProblem, config: fused_triton.TritonConfig | None = None):
    """Weighted sum of each query's window values.

    Args:
      attn: ``[B, *X, H, prod(K)]`` (float32 or v's dtype); masked slots are ignored.
      v: ``[B, *X, H_kv, D_v]``.
      problem: the validated call (`jna._src.arguments.check_av_call`).

    Returns:
      ``[B, *X, H, D_v]`` in v's dtype. Differentiable in attn and v.
    """
    st = _static(problem, config)
    ap = planning.permute(attn, st.plan, "q")
    vp = planning.permute(v, st.plan, "kv", _padded_dim(problem.value_dim))
    out = _av_p(ap, vp, st)
    return planning.unpermute(out, st.plan, "q", problem.spatial_shape, problem.value_dim)


def attention(q, k, v, problem: NAProblem, config: fused_triton.TritonConfig | None = None,
              rpb=None):
    """Unfused neighborhood attention: QK (+ bias) -> softmax (float32) -> AV.

    Args:
      q: ``[B, *X, H, D]``; k: ``[B, *X, H_kv, D]``; v: ``[B, *X, H_kv, D_v]``.
      problem: the validated call (`jna._src.arguments.check_call`).
      config: tiles and launch parameters; default `default_config(problem)`.
      rpb: None or the relative positional bias ``[H, 2K_1 - 1, ..., 2K_n - 1]`` (validated;
        non-causal, stride 1), added to the float32 logits.

    Returns:
      ``(out, lse)``: ``[B, *X, H, D_v]`` in q's dtype and ``[B, *X, H]`` float32.
    """
    st = _static(problem, config)
    qp = planning.permute(q, st.plan, "q", _padded_dim(problem.head_dim))
    kp = planning.permute(k, st.plan, "kv", _padded_dim(problem.head_dim))
    vp = planning.permute(v, st.plan, "kv", _padded_dim(problem.value_dim))
    # Stays in the permuted layout between the kernels. Rows of padding queries hold unspecified
    # values; every kernel masks them out.
    logits = _qk_p(qp, kp, st)
    if rpb is not None:
        # [*X, H, KK] -> the logits' permuted layout [B * G, Nq, H, KK]; the same for every batch
        # entry, so permute one copy and broadcast over the batch (padding rows get 0).
        bias = planning.permute(relative_position_bias(rpb, problem.params)[None], st.plan, "q")
        bias = jnp.broadcast_to(bias[None], (problem.batch, *bias.shape))  # [B, G, Nq, H, KK]
        logits = logits + bias.reshape(logits.shape)
    lse = jax.nn.logsumexp(logits, axis=-1)
    attn = jnp.exp(logits - lse[..., None])
    out = _av_p(attn, vp, st)
    spatial = problem.spatial_shape
    out = planning.unpermute(out, st.plan, "q", spatial, problem.value_dim)
    lse = planning.unpermute(lse, st.plan, "q", spatial)
    return out, lse


# ----------------------------------------------------------------------------------------------
# The backend (the contract of `jna.backends.base`)
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Unfused(TritonBackend):
    """unfused: QK (+ bias) / float32 softmax / AV Pallas Triton kernels, attention weights
    exposed (`qk`, `av`: the public ``na*d_qk``/``na*d_av`` run these). Explicit only: not in
    ``auto``. ``Unfused(TritonConfig(...))`` runs that config's tiles and launch parameters."""

    config: fused_triton.TritonConfig | None = None

    name: ClassVar[str] = NAME
    config_type: ClassVar[type] = fused_triton.TritonConfig
    supports_rpb: ClassVar[bool] = True
    default_config = staticmethod(default_config)
    default_config_source = staticmethod(config_source)

    def candidate_configs(self, problem: NAProblem, shapes_per_class: int = 2) -> list:
        return tune_candidates(problem.params, problem.head_dim, shapes_per_class)

    def attention(self, q, k, v, problem: NAProblem, rpb=None):
        return attention(q, k, v, problem, self.config_for(problem), rpb)

    def qk(self, q, k, problem: NAProblem):
        return qk(q, k, problem, self.config_for(problem))

    def av(self, attn, v, problem: NAProblem):
        return av(attn, v, problem, self.config_for(problem))
