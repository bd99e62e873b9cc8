"""What every jna benchmark shares: the candidates (jna backends, the dense baseline), the jitted
forward and forward+backward functions, timing within a budget, and a memory-fit check.

Used by `benchmarks/bench.py` (the benchmark CLI) and `benchmarks/gpu_check.py`.

Timing: `jna.tuning.timing.median_ms` (synchronized batches after warm-up) on random inputs, never on
zeros. Forward+backward is the jitted VJP of ``sum(out * dout)`` with ``dout`` an argument (not a
constant XLA could fold), i.e. the q, k and v gradients. JVP is the jitted ``jax.jvp`` along
tangents that are arguments too (output and tangent).
"""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp

import jna
from jna.tuning.timing import budgeted_median_ms as time_ms
from jna.tuning.timing import fwd_bwd

MODES = ("fwd", "fwd_bwd", "jvp")
FWD_BWD_FLOP_FACTOR = 3.5  # problems.json: forward+backward counts as 3.5x the forward
# A JVP's products at least: S = QK^T, tQ K^T, Q tK^T, PV, (P o tS) V, P tV: 3x the forward's two.
JVP_FLOP_FACTOR = 3.0
MODE_LABELS = {"fwd": "fwd", "fwd_bwd": "fwd+bwd", "jvp": "jvp"}


def dense_baseline_name() -> str:
    """``cudnn-dense`` on NVIDIA GPUs, else ``xla-dense`` (what the device's dense attention is)."""
    return "cudnn-dense" if jax.default_backend() == "gpu" else "xla-dense"


def dense_attention(q, k, v):
    """Dense (full) self-attention over the flattened map: ``[B, *X, H, D]`` -> ``[B, *X, H, D_v]``.

    cuDNN's fused attention on a GPU (``implementation="cudnn"``), XLA's elsewhere.
    """
    batch, heads = q.shape[0], q.shape[-2]
    flat = lambda x: x.reshape(batch, -1, x.shape[-2], x.shape[-1])
    impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
    out = jax.nn.dot_product_attention(flat(q), flat(k), flat(v), implementation=impl)
    return out.reshape(q.shape[:-2] + (heads, v.shape[-1]))


def na_function(problem, backend: str):
    """``fn(q, k, v) -> out`` for one jna backend on ``problem`` (a `benchmarks.problems.Problem`)."""
    return functools.partial(jna.neighborhood_attention, backend=backend, **problem.na_kwargs)


def candidate(problem, name: str):
    """The function a benchmark row named ``name`` times: a jna backend or the dense baseline."""
    if name in ("cudnn-dense", "xla-dense", "dense"):
        return dense_attention
    return na_function(problem, name)


def compiled(fn, mode: str, args):
    """The jitted function for ``mode`` and its arguments: ``(jitted, args)``."""
    q, k, v, dout = args
    if mode == "fwd":
        return jax.jit(fn), (q, k, v)
    if mode == "jvp":  # tangents: the inputs reversed along the first spatial axis (not zeros)
        tangents = tuple(jnp.flip(x, axis=1) for x in (q, k, v))
        return jax.jit(lambda q, k, v, tq, tk, tv: jax.jvp(fn, (q, k, v), (tq, tk, tv))), (q, k, v, *tangents)
    return fwd_bwd(fn), (q, k, v, dout)


def device_memory_bytes() -> int | None:
    """Memory the default device's allocator may use, or None where the device does not say."""
    try:
        return int(jax.devices()[0].memory_stats()["bytes_limit"])
    except Exception:  # noqa: BLE001 - CPU devices have no memory stats
        return None


def memory_need(jitted, args) -> int | None:
    """Bytes a compiled call needs (arguments + outputs + temporaries), from XLA's analysis."""
    try:
        m = jitted.lower(*args).compile().memory_analysis()
    except Exception:  # noqa: BLE001 - no analysis on this platform
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)


def is_out_of_memory(error: Exception) -> bool:
    text = f"{type(error).__name__}: {error}"
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def measure(problem, name: str, mode: str, args, budget_s: float, memory_limit: int | None) -> dict:
    """One benchmark cell: ``{"ms": ...}``, or ``{"skipped": why}`` / ``{"error": ...}``.

    Problems that would not fit in ``memory_limit`` bytes (XLA's compiled memory analysis) are
    reported as such before running; an out-of-memory error at run time is reported too.
    """
    fn = candidate(problem, name)
    jitted, call_args = compiled(fn, mode, args)
    try:
        need = memory_need(jitted, call_args) if memory_limit else None
        if need is not None and need > memory_limit:
            return {"skipped": f"does not fit: needs {need / 2**30:.1f} GiB of {memory_limit / 2**30:.1f} GiB"}
        return {"ms": round(time_ms(jitted, call_args, budget_s), 4)}
    except NotImplementedError as e:
        return {"skipped": f"not supported: {str(e).splitlines()[0][:200]}"}
    except TypeError as e:  # jax.jvp of a custom_vjp function (cuDNN's dense attention)
        if "forward-mode" not in str(e):
            raise
        return {"skipped": "not supported: no forward-mode autodiff"}
    except Exception as e:  # noqa: BLE001 - one cell failing must not end the run
        if is_out_of_memory(e):
            return {"skipped": "out of memory at run time"}
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}


def tiles_used(problem, backend: str, dtype=jnp.bfloat16) -> str:
    """The tile config a fused backend runs ``problem`` with, and its tile efficiency ('' if none)."""
    from jna import backends
    from jna.backends import tiling
    if backend not in ("fused-triton", "fused-mosaic"):
        return ""
    cfg = backends.get(backend).config_for(problem.na_problem(dtype))
    eff = tiling.tile_efficiency(problem.params, cfg.q_tile, cfg.kv_tile)
    text = f"q{'x'.join(map(str, cfg.q_tile))} kv{'x'.join(map(str, cfg.kv_tile))}"
    if backend == "fused-mosaic":
        text += f" s{cfg.num_stages}"
        text += " direct" if cfg.direct_layout else ""
        text += " persistent" if cfg.persistent else ""
    return f"{text} eff {eff:.2f}"


def tflops(problem, mode: str, ms: float) -> float:
    factor = {"fwd": 1.0, "fwd_bwd": FWD_BWD_FLOP_FACTOR, "jvp": JVP_FLOP_FACTOR}[mode]
    return problem.forward_flops * factor / (ms * 1e-3) / 1e12


def write_results(out_dir, stem: str, rows: list, markdown: str) -> None:
    """``<out_dir>/<stem>.json`` (device kind, jax version, rows) and ``<stem>.md`` (the table)."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows)
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    (out / f"{stem}.md").write_text(markdown)
