"""The `fused-mosaic` backend (prototype, forward only): fused NA with Pallas' Mosaic GPU backend.

Same data flow as `jna.backends.fused_triton` (DESIGN.md section 2), built for Hopper (sm90):

1. `jna.plan.make_plan` tiles every axis; `jna.plan.permute` makes every Q/KV tile one
   contiguous run of ``[B * G, tiles * tile_tokens, H, D]``.
2. One CTA per (Q tile, batch*group, head), warp specialized like FA3
   (`jax.experimental.pallas.ops.gpu.attention_mgpu`): ``Q tile tokens / 64`` consumer
   warpgroups (1 or 2) each own 64 query rows; one producer warpgroup walks the same KV visit
   list and streams K/V tiles with TMA (`plgpu.copy_gmem_to_smem`) into a ``num_stages`` SMEM
   ring guarded by barriers. The visit list is the product of the per-axis ranges read from the
   plan tables in GMEM (scalar loads: there is no scalar prefetch on GPU).
3. Consumers: ``S = Q K^T`` and ``O += P V`` with `plgpu.wgmma`, online softmax in float32
   registers (base 2, as the Triton kernel), the elementwise mask only on partial tile pairs
   (the plan's ``pair_full`` flags), built from the shared window functions through
   `jna.backends.tiling.Geometry` (per query row: window bounds; per key column: tile-local
   coordinates; the 2-D part is only compares).
4. Output through SMEM + TMA; the float32 logsumexp is written ``[B*G, H, tokens]`` (so one
   warpgroup's 64 rows are one contiguous TMA box) and transposed in XLA.

On a machine without a GPU the kernel runs in the Mosaic GPU simulator
(`plgpu.InterpretGPUParams`), slowly; tests use tiny shapes. The simulator (jax 0.11.2)
implements neither `pl.run_state` (its interpreter lets it fall through and fails with "Cannot
lower jaxpr with effects") nor wgmma with the A operand in registers ("Expected shape (6,) but
got (64, 64)": it looks A up as an SMEM allocation). FA3 uses both for ``O += P V``. Simulated
(`_Static.simulated`), the kernel stages P through SMEM and adds ``P V`` from a fresh
accumulator; on the GPU it accumulates in place from registers. Everything else (plan lookups,
TMA ring and barriers, masks, softmax, epilogue) is the same code.

Run ``python -m jna.backends.fused_mosaic`` on an H100 to check a few shapes against the
reference backend and time the public problems against cuDNN.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jna import plan as planning
from jna import semantics
from jna.arguments import NAProblem
from jna.backends import device
from jna.backends import tiling

NAME = "fused-mosaic"

_LOG2E = tiling.LOG2E
_LN2 = tiling.LN2
_MASK_VALUE = tiling.MASK_VALUE

_ROWS = 64  # query rows per consumer warpgroup (the M of one wgmma)
_WGMMA = plgpu.Layout.WGMMA
_WGMMA_ROW = plgpu.Layout.WGMMA.reduce(1)
_WGMMA_COL = plgpu.Layout.WGMMA.reduce(0)
_HEAD_DIMS = (64, 128)
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


# ----------------------------------------------------------------------------------------------
# Availability and configuration
# ----------------------------------------------------------------------------------------------


def _interpret() -> bool:
    return device.emulated()


def is_available() -> tuple[bool, str]:
    return device.gpu_availability(9.0, 10.0, "an NVIDIA Hopper GPU (sm90, wgmma)",
                                   "Mosaic GPU simulator on CPU")


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


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Tile shapes and pipeline depth of the fused Mosaic GPU forward kernel.

    ``q_tile``/``kv_tile``: per-axis extents (powers of two). A Q tile holds 64 or 128 tokens
    (one or two consumer warpgroups of 64 rows), a KV tile 64 or 128 tokens.
    ``num_stages``: depth of the K/V SMEM ring (2 or 3; 3 with 128x128 tiles at D=128 uses
    224 KiB of the 227 KiB of SMEM).
    """

    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    num_stages: int = 2

    def __post_init__(self):
        for name in ("q_tile", "kv_tile"):
            tile = tuple(int(t) for t in getattr(self, name))
            object.__setattr__(self, name, tile)
            for t in tile:
                if t < 1 or t & (t - 1):
                    raise ValueError(f"MosaicConfig.{name} = {tile}: every extent must be a power of two")
            if math.prod(tile) not in (64, 128):
                raise ValueError(f"MosaicConfig.{name} = {tile}: must hold 64 or 128 tokens")
        if len(self.q_tile) != len(self.kv_tile):
            raise ValueError(f"MosaicConfig: q_tile {self.q_tile} and kv_tile {self.kv_tile} differ in rank")
        if self.num_stages not in (2, 3, 4):
            raise ValueError(f"MosaicConfig.num_stages = {self.num_stages}: must be 2, 3 or 4")

    @property
    def q_tokens(self) -> int:
        return math.prod(self.q_tile)

    @property
    def kv_tokens(self) -> int:
        return math.prod(self.kv_tile)


# (q tokens, kv tokens, stages, relative speed). Priors from FA3 on H100 (128 query rows per CTA
# in two warpgroups, 128-token KV blocks), NOT calibrated for this kernel yet: the chooser
# multiplies them by a problem's tile efficiency, as fused-triton does with its measured speeds.
_CLASSES = (
    (128, 128, 2, 1.00),
    (128, 64, 3, 0.90),
    (64, 128, 2, 0.60),
    (64, 64, 3, 0.55),
)


@functools.lru_cache(maxsize=1024)
def _choose(params: semantics.NAParams) -> MosaicConfig:
    caps = tiling.axis_caps(params)
    best, best_score = None, -1.0
    for q_tokens, kv_tokens, stages, speed in _CLASSES:
        for q_tile in tiling.tile_shapes(q_tokens, caps):
            for kv_tile in tiling.tile_shapes(kv_tokens, caps):
                score = tiling.tile_efficiency(params, q_tile, kv_tile) * speed
                if score > best_score:
                    best_score, best = score, MosaicConfig(q_tile, kv_tile, stages)
    if best is None:  # the whole padded map holds fewer than 64 tokens: one 64-token tile
        tile = tiling.fit_tile(tuple(caps), params, min_tokens=64)
        best = MosaicConfig(tile, tile, 2)
    return best


def default_config(problem: NAProblem) -> MosaicConfig:
    """The config that maximizes ``tile efficiency * prior speed`` (see `_CLASSES`)."""
    return _choose(problem.params)


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything static about one launch. ``plan`` is what `jna.backends.tiling.Geometry` reads."""

    plan: planning.TilePlan
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    dtype: object
    config: MosaicConfig
    # Mosaic GPU simulator parameters, or None on the GPU. The simulator (jax 0.11.2) implements
    # neither `pl.run_state` nor wgmma with its A operand in registers: simulated, P goes
    # through SMEM and P V into a fresh accumulator that is added to O. On the GPU: FA3's
    # in-place O += P V from registers.
    simulator: plgpu.InterpretGPUParams | None

    @property
    def simulated(self) -> bool:
        return self.simulator is not None

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def consumers(self) -> int:
        return self.config.q_tokens // _ROWS


def _pow2_unravel(index, radices):
    """`jna.backends.tiling.unravel` for power-of-two radices and non-negative indices (shift, and)."""
    parts, shift = [], 0
    for r in reversed(radices):
        parts.append(lax.shift_right_logical(index, shift) & (r - 1) if shift else index & (r - 1))
        shift += r.bit_length() - 1
    return parts[::-1]


def _sync(barrier):
    plgpu.barrier_arrive(barrier)
    plgpu.barrier_wait(barrier)


def _forward_kernel(q_ref, k_ref, v_ref, tab_ref, o_ref, lse_ref, scoped, *, st: _Static):
    (q_smem, k_smem, v_smem, lse_smem, p_smem), (q_bars, k_bars, v_bars), (k_free, v_free), sched = scoped
    plan, cfg = st.plan, st.config
    rank, stages, nwg = plan.rank, cfg.num_stages, st.consumers
    tq, tk, dim = cfg.q_tokens, cfg.kv_tokens, st.head_dim

    qt_flat = lax.axis_index("q")
    bg = lax.axis_index("bg")
    head = lax.axis_index("h")
    wg = lax.axis_index("wg")

    # Plan lookups, shared by producer and consumers (a few scalar loads from GMEM).
    geo = tiling.Geometry(st.plan, tab_ref, bg)
    qt = tiling.unravel(qt_flat, [a.num_q_tiles for a in plan.axes])
    ranges = [geo.kv_range(a, qt[a]) for a in range(rank)]
    counts = [c for _, c in ranges]
    total = functools.reduce(lambda x, y: x * y, counts)  # >= 1 for every Q tile

    def kv_tile(step):
        offs = tiling.unravel(step, counts)
        kt = [first + o for (first, _), o in zip(ranges, offs)]
        return kt, tiling.ravel(kt, [a.num_kv_tiles for a in plan.axes])

    @pl.when(wg < nwg)
    def _consumer():
        if nwg > 1:
            plgpu.set_max_registers(232, action="increase")
        q_slot, lse_slot = q_smem.at[wg], lse_smem.at[wg]
        base = qt_flat * tq + wg * _ROWS
        plgpu.copy_gmem_to_smem(q_ref.at[bg, pl.ds(base, _ROWS), head], q_slot, q_bars.at[wg])

        # Per query row: its window on each axis, in group coordinates (shared rules), with the
        # stop clamped to the group length (padding keys are never allowed).
        rows = plgpu.broadcasted_iota(jnp.int32, (_ROWS,), 0, layout=_WGMMA_ROW) + wg * _ROWS
        q_local = tiling.unravel(rows, cfg.q_tile)
        windows = []
        for a in range(rank):
            start, stop = geo.window(a, qt[a] * cfg.q_tile[a] + q_local[a])
            windows.append((start, jnp.minimum(stop, geo.lg[a])))

        qk_scale = st.scale * _LOG2E
        m = plgpu.layout_cast(jnp.full((_ROWS,), _MASK_VALUE, jnp.float32), _WGMMA_ROW)
        l = plgpu.layout_cast(jnp.zeros((_ROWS,), jnp.float32), _WGMMA_ROW)
        acc = plgpu.layout_cast(jnp.zeros((_ROWS, dim), jnp.float32), _WGMMA)

        plgpu.barrier_wait(q_bars.at[wg])
        plgpu.barrier_wait(k_bars.at[0])  # step 0 always exists
        if nwg > 1:
            pl.when(wg == 1)(lambda: _sync(sched))

        def mask(s, kt):
            # Per key column: its tile-local coordinate on each axis. Recomputed here rather
            # than carried through the loop: as [tk] column vectors they would pin tk/4
            # registers per axis for the whole loop.
            cols = plgpu.broadcasted_iota(jnp.int32, (tk,), 0, layout=_WGMMA_COL)
            k_local = _pow2_unravel(cols, cfg.kv_tile)
            allowed = None
            for a in range(rank):
                shift = kt[a] * cfg.kv_tile[a]
                start, stop = windows[a]
                lo = lax.broadcast_in_dim(start - shift, s.shape, [0])
                hi = lax.broadcast_in_dim(stop - shift, s.shape, [0])
                y = lax.broadcast_in_dim(k_local[a], s.shape, [1])
                ok = (lo <= y) & (y < hi)
                allowed = ok if allowed is None else allowed & ok
            return jnp.where(allowed, s, -jnp.inf)

        def body(step, carry):
            acc, m, l = carry
            slot = lax.rem(step, stages)
            kt, _ = kv_tile(step)
            full = geo.full(qt, kt) > 0  # table loads issued ahead of the wgmma wait

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, q_slot, k_smem.at[slot].T)
                if nwg > 1:
                    _sync(sched)
                return acc_ref[...]

            s = pl.run_scoped(qk, plgpu.ACC((_ROWS, tk), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            s = lax.cond(full, lambda s: s, lambda s: mask(s, kt), s)

            # Raw logits s, m in scaled base-2 units: p = exp2(s * c - m) is one FMA per logit.
            # Masked logits are -inf (p = 0 exactly) while m starts finite (_MASK_VALUE), so a
            # row whose keys are all masked in this tile keeps m and gets p = 0, never NaN.
            # (A finite mask value would be wrong here: the compiler contracts s * c - m into
            # an FMA, and the rounding error of a huge masked s * c reaches exp2 as +-1e30.)
            m_new = jnp.maximum(m, s.max(axis=1) * qk_scale)
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s * qk_scale - lax.broadcast_in_dim(m_new, s.shape, [0]))
            l = l * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            p16 = p.astype(st.dtype)
            if nwg > 1:
                acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
                plgpu.barrier_arrive(sched)
                plgpu.barrier_wait(v_bars.at[slot])
                plgpu.barrier_wait(sched)
            else:
                plgpu.barrier_wait(v_bars.at[slot])

            def wait_next_k():
                @pl.when(step + 1 < total)
                def _():
                    plgpu.barrier_wait(k_bars.at[lax.rem(step + 1, stages)])

            if not st.simulated:  # FA3: P from registers, accumulate in place
                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                    wait_next_k()

                acc = pl.run_state(pv)(plgpu.ACC.init(acc))
            else:  # the simulator's wgmma reads A from SMEM only and has no run_state
                p_slot = p_smem.at[wg]
                p_slot[...] = p16
                plgpu.commit_smem()

                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p_slot, v_smem.at[slot])
                    wait_next_k()
                    return acc_ref[...]

                acc = acc + pl.run_scoped(pv, plgpu.ACC((_ROWS, dim), jnp.float32))
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l

        acc, m, l = lax.fori_loop(0, total, body, (acc, m, l))
        if nwg > 1:
            pl.when(wg == 0)(lambda: _sync(sched))

        # Q's SMEM slot is free once this warpgroup's last Q K^T is done: it stages the output.
        q_slot[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(st.dtype)
        lse_slot[...] = (m + jnp.log2(l)) * _LN2
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_slot, o_ref.at[bg, pl.ds(base, _ROWS), head])
        plgpu.copy_smem_to_gmem(lse_slot, lse_ref.at[bg, head, pl.ds(base, _ROWS)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == nwg)
    def _producer():
        if nwg > 1:
            plgpu.set_max_registers(40, action="decrease")
        kv_head = lax.div(head, st.group)

        def issue(step, slot, wait: bool):
            """TMA of KV tile ``step`` into ring ``slot`` (after its last reader released it)."""
            _, kt_flat = kv_tile(step)
            tokens = pl.ds(kt_flat * tk, tk)
            for ref, smem, ready, free in ((k_ref, k_smem, k_bars, k_free), (v_ref, v_smem, v_bars, v_free)):
                if wait:
                    plgpu.barrier_wait(free.at[slot])
                plgpu.copy_gmem_to_smem(ref.at[bg, tokens, kv_head], smem.at[slot], ready.at[slot])

        for i in range(stages):
            pl.when(i < total)(functools.partial(issue, i, i, False))

        @pl.loop(0, total - stages)
        def _(i):
            issue(i + stages, lax.rem(i, stages), True)

        # Drain: observe the consumers' releases of the last steps. Nearly free on the GPU (the
        # producer has nothing left to do); the simulator insists that every waiter of a
        # barrier has seen all of its phases before the barrier is deallocated.
        for s in range(stages):
            @pl.when(s < total)
            def _():
                plgpu.barrier_wait(k_free.at[s])
                plgpu.barrier_wait(v_free.at[s])


def _smem(shape, dtype):
    """SMEM tile in the wgmma operand layout: (8, 64) tiles, 128-byte swizzle."""
    return plgpu.SMEM(
        shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    )


def _forward_call(qp, kp, vp, st: _Static):
    """``qp`` ``[BG, Nq, H, D]``, ``kp``/``vp`` ``[BG, Nk, H_kv, D]`` -> out, lse ``[BG, H, Nq]``."""
    plan, cfg = st.plan, st.config
    bg, nq = qp.shape[0], qp.shape[1]
    nwg, stages = st.consumers, cfg.num_stages
    tables = jnp.asarray(plan.tables)

    def entry(q_ref, k_ref, v_ref, tab_ref, o_ref, lse_ref):
        scratch = (
            _smem((nwg, _ROWS, st.head_dim), st.dtype),
            _smem((stages, cfg.kv_tokens, st.head_dim), st.dtype),
            _smem((stages, cfg.kv_tokens, st.head_dim), st.dtype),
            plgpu.SMEM((nwg, _ROWS), jnp.float32),
            _smem((nwg, _ROWS, cfg.kv_tokens), st.dtype) if st.simulated else None,
        )
        arrivals = (
            plgpu.Barrier(num_barriers=nwg),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
        )
        consumed = (plgpu.Barrier(num_arrivals=nwg, num_barriers=stages),) * 2
        sched = plgpu.Barrier(num_arrivals=nwg) if nwg > 1 else None
        pl.run_scoped(
            lambda *scoped: _forward_kernel(q_ref, k_ref, v_ref, tab_ref, o_ref, lse_ref, scoped, st=st),
            scratch,
            arrivals,
            consumed,
            sched,
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=[
            jax.ShapeDtypeStruct(qp.shape, qp.dtype),
            jax.ShapeDtypeStruct((bg, st.heads, nq), jnp.float32),
        ],
        grid=(plan.num_q_tiles, bg, st.heads),
        grid_names=("q", "bg", "h"),
        num_threads=nwg + 1,
        thread_name="wg",
        # Row max/sum in the wgmma layout reduce within warps: no cross-warp scratch needed,
        # which leaves room for a third 128x128 K/V stage at D=128.
        compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0),
        interpret=st.simulator,
    )(qp, kp, vp, tables)


def _static(problem: NAProblem, config: MosaicConfig, simulator) -> _Static:
    reason = unsupported_reason(problem)
    if reason is not None:
        raise NotImplementedError(f"backend='{NAME}' does not support this call: {reason}")
    if len(config.q_tile) != problem.rank:
        raise ValueError(f"tile config {config} does not have {problem.rank} axes")
    return _Static(
        plan=planning.make_plan(problem.params, config.q_tile, config.kv_tile),
        heads=problem.heads,
        kv_heads=problem.kv_heads,
        head_dim=problem.head_dim,
        scale=problem.scale,
        dtype=jnp.dtype(problem.dtype),
        config=config,
        simulator=simulator,
    )


def _run(q, k, v, problem: NAProblem, config: MosaicConfig, simulator=None):
    """The forward on the GPU (``simulator`` None) or in the Mosaic GPU simulator."""
    st = _static(problem, config, simulator)
    plan = st.plan
    qp = planning.permute(q, plan, "q")
    kp = planning.permute(k, plan, "kv")
    vp = planning.permute(v, plan, "kv")
    out, lse = _forward_call(qp, kp, vp, st)
    spatial = problem.spatial_shape
    out = planning.unpermute(out, plan, "q", spatial)
    lse = planning.unpermute(jnp.swapaxes(lse, 1, 2), plan, "q", spatial)
    return out, lse


def attention_forward(q, k, v, problem: NAProblem, config: MosaicConfig | None = None):
    """Fused neighborhood attention, forward only (not differentiable).

    Args:
      q: ``[B, *X, H, D]``; k, v: ``[B, *X, H_kv, D]`` (bfloat16/float16, D in {64, 128}).
      problem: the validated call (`jna.arguments.check_call`).
      config: tile config; default `default_config(problem)`.

    Returns:
      ``(out, lse)``: ``[B, *X, H, D]`` in q's dtype and ``[B, *X, H]`` float32 (natural log).
    """
    simulator = plgpu.InterpretGPUParams() if _interpret() else None
    return _run(q, k, v, problem, config or default_config(problem), simulator)


def lower_for_gpu(problem: NAProblem, config: MosaicConfig | None = None):
    """Lowers the GPU (non-simulated) forward for ``problem`` to StableHLO for CUDA.

    Runs on any machine: Pallas lowers the kernel through Mosaic GPU (layouts, wgmma shapes,
    TMA and SMEM checks) into the custom call it embeds; only the PTX/SASS compilation of that
    module happens later, on a GPU. Returns the `jax.stages.Lowered`.
    """
    config = config or default_config(problem)
    shape = lambda heads, dim: jax.ShapeDtypeStruct(
        (problem.batch, *problem.spatial_shape, heads, dim), problem.dtype)
    fn = jax.jit(functools.partial(_run, problem=problem, config=config, simulator=None))
    args = (shape(problem.heads, problem.head_dim), shape(problem.kv_heads, problem.head_dim),
            shape(problem.kv_heads, problem.value_dim))
    return fn.trace(*args).lower(lowering_platforms=("cuda",))


# ----------------------------------------------------------------------------------------------
# GPU check and benchmark: python -m jna.backends.fused_mosaic  (H100; about 2-3 minutes)
# ----------------------------------------------------------------------------------------------

# (name, shape, kernel, stride, dilation, causal, heads, kv heads, head_dim, dtype, config or None)
_CHECKS = (
    ("1d", (2048,), 256, 1, 1, False, 4, 4, 128, "bfloat16", None),
    ("1d-causal-dilated-gqa-1wg", (1500,), 100, 7, 3, True, 4, 1, 128, "bfloat16",
     MosaicConfig((64,), (64,), 3)),
    ("2d-strided-dilated-gqa", (64, 64), (13, 9), (1, 3), (1, 2), False, 4, 2, 64, "float16", None),
    ("2d-causal-1wg", (40, 56), 11, 2, 1, (True, False), 2, 2, 64, "bfloat16",
     MosaicConfig((8, 8), (8, 8), 3)),
    ("3d", (12, 16, 20), (5, 7, 6), (2, 1, 3), (1, 2, 1), (True, False, False), 4, 2, 128,
     "bfloat16", None),
    ("3d-128x128-3stages", (16, 16, 16), 6, 1, 1, False, 2, 2, 128, "bfloat16",
     MosaicConfig((4, 4, 8), (4, 8, 4), 3)),
)


def _random(shape, dtype, seed):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _problem_of(q, k, v, kernel_size, stride, dilation, is_causal) -> NAProblem:
    from jna.arguments import check_call

    return check_call(q, k, v, kernel_size, stride, dilation, is_causal, None, None, None, None)


def _check(batch: int = 2) -> bool:
    import jna

    ok = True
    print(f"{'check':28s} {'config':42s} {'out rel L2':>10s} {'lse max err':>11s}")
    for name, shape, ks, st, dl, ca, heads, kv_heads, dim, dtype, config in _CHECKS:
        q = _random((batch, *shape, heads, dim), dtype, 1)
        k = _random((batch, *shape, kv_heads, dim), dtype, 2)
        v = _random((batch, *shape, kv_heads, dim), dtype, 3)
        try:
            problem = _problem_of(q, k, v, ks, st, dl, ca)
            config = config or default_config(problem)
            out, lse = jax.jit(functools.partial(attention_forward, problem=problem, config=config))(q, k, v)
            up = lambda x: x.astype(jnp.float32)
            ref = jax.jit(functools.partial(jna.neighborhood_attention, kernel_size=ks, stride=st,
                                            dilation=dl, is_causal=ca, return_lse=True,
                                            backend="reference"))
            r_out, r_lse = ref(up(q), up(k), up(v))
            out, r_out = np.asarray(up(out), np.float64), np.asarray(r_out, np.float64)
            rel = float(np.linalg.norm(out - r_out) / np.linalg.norm(r_out))
            lse_err = float(np.max(np.abs(np.asarray(lse) - np.asarray(r_lse))))
            good = np.isfinite(rel) and rel <= 1e-2 and lse_err <= 2e-2
            cfg = f"q{config.q_tile} kv{config.kv_tile} x{config.num_stages}"
            print(f"{name:28s} {cfg:42s} {rel:10.2e} {lse_err:11.2e}  {'ok' if good else 'FAIL'}",
                  flush=True)
        except Exception as e:  # keep going: report every case
            good = False
            print(f"{name:28s} ERROR {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
        ok &= bool(good)
    return ok


def _public_problems(names=None) -> list[dict]:
    """The public problems with head_dim 128 (``configs/problems/public.json``)."""
    import json
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "configs" / "problems" / "public.json"
    problems = [p for p in json.loads(path.read_text())["problems"] if p["head_dim"] == 128]
    return [p for p in problems if not names or p["name"] in names]


def _sweep(problems, repeats: int = 10):
    """Kernel-only times of every tile class (its best tile shapes) per problem: calibration
    data for `_CLASSES`."""
    from jna.timing import median_ms

    print(f"{'problem':15s} {'class':12s} {'config':34s} {'eff':>5s} {'kernel ms':>9s} {'TFLOP/s':>8s}")
    for p in problems:
        b, h, d, shape = p["batch"], p["heads"], p["head_dim"], tuple(p["shape"])
        q, k, v = (_random((b, *shape, h, d), jnp.bfloat16, s) for s in (1, 2, 3))
        problem = _problem_of(q, k, v, p["kernel_size"], p["stride"], p["dilation"], p["is_causal"])
        flops = 4.0 * b * h * math.prod(shape) * math.prod(p["kernel_size"]) * d
        caps = tiling.axis_caps(problem.params)
        for q_tokens, kv_tokens, stages, _ in _CLASSES:
            shapes = [(qt, kt) for qt in tiling.tile_shapes(q_tokens, caps)
                      for kt in tiling.tile_shapes(kv_tokens, caps)]
            if not shapes:
                continue
            qt, kt = max(shapes, key=lambda s: tiling.tile_efficiency(problem.params, *s))
            config = MosaicConfig(qt, kt, stages)
            name = f"{q_tokens}/{kv_tokens}x{stages}"
            try:
                st = _static(problem, config, None)
                qp = planning.permute(q, st.plan, "q")
                kp = planning.permute(k, st.plan, "kv")
                vp = planning.permute(v, st.plan, "kv")
                ms = median_ms(jax.jit(functools.partial(_forward_call, st=st)), qp, kp, vp,
                               repeats=repeats)
                print(f"{p['name']:15s} {name:12s} {'q' + str(qt) + ' kv' + str(kt):34s} "
                      f"{st.plan.efficiency:5.2f} {ms:9.3f} {flops / ms / 1e9:8.1f}", flush=True)
            except Exception as e:
                print(f"{p['name']:15s} {name:12s} ERROR {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200]}", flush=True)


def _benchmark(problems, repeats: int = 10, triton: bool = False):
    """Times fused-mosaic (kernel alone and with the permutations) against cuDNN dense attention."""
    from jna.timing import median_ms

    header = (f"{'problem':15s} {'config':34s} {'eff':>5s} {'kernel ms':>9s} {'total ms':>9s} "
              f"{'TFLOP/s':>8s} {'cuDNN ms':>9s} {'speedup':>8s}")
    print(header + (f" {'triton ms':>9s}" if triton else ""))
    for p in problems:
        b, h, d, shape = p["batch"], p["heads"], p["head_dim"], tuple(p["shape"])
        args = dict(kernel_size=tuple(p["kernel_size"]), stride=tuple(p["stride"]),
                    dilation=tuple(p["dilation"]), is_causal=tuple(p["is_causal"]))
        q, k, v = (_random((b, *shape, h, d), jnp.bfloat16, s) for s in (1, 2, 3))
        flops = 4.0 * b * h * math.prod(shape) * math.prod(args["kernel_size"]) * d
        row = f"{p['name']:15s}"
        try:
            problem = _problem_of(q, k, v, *args.values())
            config = default_config(problem)
            st = _static(problem, config, None)
            eff = st.plan.efficiency
            tiles = f"q{config.q_tile} kv{config.kv_tile} x{config.num_stages}"
            row += f" {tiles:34s} {eff:5.2f}"
            qp = planning.permute(q, st.plan, "q")
            kp = planning.permute(k, st.plan, "kv")
            vp = planning.permute(v, st.plan, "kv")
            kernel = jax.jit(functools.partial(_forward_call, st=st))
            total = jax.jit(functools.partial(attention_forward, problem=problem, config=config))
            t_kernel = median_ms(kernel, qp, kp, vp, repeats=repeats)
            t_total = median_ms(total, q, k, v, repeats=repeats)
            row += f" {t_kernel:9.3f} {t_total:9.3f} {flops / t_total / 1e9:8.1f}"
        except Exception as e:
            print(f"{row} ERROR {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
            continue
        flat = lambda x: x.reshape(b, -1, h, d)
        try:
            dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
                flat(q), flat(k), flat(v), implementation="cudnn"))
            t_dense = median_ms(dense, q, k, v, warmup=1, repeats=max(3, repeats // 3))
            row += f" {t_dense:9.2f} {t_dense / t_total:7.2f}x"
        except Exception as e:
            row += f" cuDNN error: {type(e).__name__}"
        if triton:
            import jna

            try:
                tri = jax.jit(functools.partial(jna.neighborhood_attention, **args,
                                                backend="fused-triton"))
                row += f" {median_ms(tri, q, k, v, repeats=repeats):9.3f}"
            except Exception as e:
                row += f" triton error: {type(e).__name__}"
        print(row, flush=True)


def _main(argv=None) -> int:
    import argparse
    import time

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-check", action="store_true",
                        help="skip the comparison with the reference backend")
    parser.add_argument("--skip-bench", action="store_true", help="skip the timings")
    parser.add_argument("--problems", default="",
                        help="comma-separated public problem names (default: all with D=128)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--triton", action="store_true", help="also time fused-triton (slow to compile)")
    parser.add_argument("--sweep", action="store_true",
                        help="also time every tile class per problem (calibration; several minutes)")
    args = parser.parse_args(argv)
    dev = device.default_device()
    print(f"jax {jax.__version__} on {dev.device_kind} ({dev.platform}); "
          f"fused-mosaic: {is_available()}")
    if not runs_natively():
        print("fused-mosaic needs a Hopper GPU for this script; on CPU run "
              "`python -m pytest jna_tests/test_fused_mosaic_sim.py` (simulator + lowering).")
        return 2
    start = time.perf_counter()
    ok = True
    if not args.skip_check:
        ok = _check()
        print(f"checks {'passed' if ok else 'FAILED'} ({time.perf_counter() - start:.0f} s)\n", flush=True)
    if not args.skip_bench:
        problems = _public_problems([n for n in args.problems.split(",") if n])
        _benchmark(problems, args.repeats, args.triton)
        if args.sweep:
            print()
            _sweep(problems, args.repeats)
    print(f"\ndone in {time.perf_counter() - start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(_main())
