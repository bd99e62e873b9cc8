"""The relative positional bias inside the fused kernels: its cost and the unfused baseline (issue 18).

    python -m benchmarks rpb [--names 2d-nat,2d-dinat,2d-flux,3d-hunyuan] [--repeats 20]
                             [--variants fused-triton,fused-triton+rpb,...] [--out DIR]

Per problem (bf16 inputs, rpb float32 as the Flax layers pass it; public, models and tiny
sets), each variant's forward and forward+backward medians (`jna.tuning.timing.median_ms`; the
backward's gradients are dq, dk, dv and, with the bias, d_rpb), effective TFLOP/s and peak
memory (XLA's compiled memory analysis: temporaries + outputs, for each of the two calls):

* ``fused-triton`` without and with rpb; ``fused-triton+rpb-gather``: with rpb gathered per
  logit from the table (the class blocks' budget set to 0: what the kernels do past it, and
  what they all did before `jna.backends.triton.bias_blocks`); ``fused-triton+rpb-blocks``: with
  the class blocks whatever their size (the budget lifted);
* ``fused-mosaic`` without and with rpb, if its class declares ``supports_rpb`` (otherwise the
  row says it is skipped and why) and it runs on this device;
* ``unfused`` with rpb (QK + bias, softmax, AV: the attention weights materialized), skipped
  when XLA says it would not fit in the device's memory.

Derived columns: the rpb overhead (with / without, same backend), the speedup over unfused with
rpb, and each rpb variant's output and gradients against fused-triton with rpb (relative L2: the
variants must agree). Writes ``rpb_bench.{json,md}`` to ``--out``. On a CPU the kernels run in
interpret mode (a smoke test: ``--names tiny-2d-k3 --repeats 1``).
"""

from __future__ import annotations

import argparse
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
import jna
from jna import backends
from jna.backends.triton import bias_blocks
from jna.tuning import problem_sets
from jna.tuning.timing import median_ms

SETS = ("public", "models", "tiny")
DEFAULT_NAMES = "2d-nat,2d-dinat,2d-flux,3d-hunyuan"
# (variant, backend, with rpb)
VARIANTS = (
    ("fused-triton", "fused-triton", False),
    ("fused-triton+rpb", "fused-triton", True),
    ("fused-triton+rpb-gather", "fused-triton", True),
    ("fused-triton+rpb-blocks", "fused-triton", True),
    ("fused-mosaic", "fused-mosaic", False),
    ("fused-mosaic+rpb", "fused-mosaic", True),
    ("unfused+rpb", "unfused", True),
)
DIAGNOSTIC = ("fused-triton+rpb-gather", "fused-triton+rpb-blocks")  # only when named in --variants
BASELINE = "fused-triton+rpb"  # what the other rpb variants' results are compared against


def _log(*args):
    print(*args, flush=True)


def _na(problem, backend: str, with_rpb: bool):
    """``f(q, k, v, rpb) -> out`` for the problem on ``backend`` (rpb ignored without it)."""
    na = {1: jna.na1d, 2: jna.na2d, 3: jna.na3d}[problem.rank]

    def f(q, k, v, rpb):
        return na(q, k, v, problem.kernel_size, problem.stride, problem.dilation, problem.is_causal,
                  backend=backend, rpb=rpb if with_rpb else None)

    return f


def _calls(f, with_rpb: bool):
    """The jitted forward ``(q, k, v, rpb) -> out`` and forward+backward ``(q, k, v, rpb, dout)
    -> (dq, dk, dv[, d_rpb])``."""
    def loss(q, k, v, rpb, dout):
        return jnp.sum(f(q, k, v, rpb).astype(jnp.float32) * dout.astype(jnp.float32))

    return jax.jit(f), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3) if with_rpb else (0, 1, 2)))


def _peak_bytes(jitted, args) -> int | None:
    """Temporaries + outputs of the compiled call (XLA's memory analysis), None if unknown."""
    m = jitted.lower(*args).compile().memory_analysis()
    return None if m is None else int(m.temp_size_in_bytes + m.output_size_in_bytes)


def _skip_reason(backend: str, with_rpb: bool, na_problem) -> str | None:
    cls = backends.backend_class(backend)
    if with_rpb and not cls.supports_rpb:
        return f"{backend} does not declare supports_rpb"
    instance = cls()
    available, why = instance.is_available()
    if not available:
        return f"{backend} is not available here: {why}"
    if backend == "fused-mosaic" and not instance.runs_natively():
        return "fused-mosaic: the simulator is not a benchmark"
    reason = instance.supports(na_problem)
    return None if reason is None else f"{backend} does not support the problem: {reason}"


def _rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _median_ms(fn, args, repeats: int) -> float:
    """`median_ms` with calls under 20 ms batched (up to 20 per sample): a single synchronized
    call of ~0.1 ms is mostly host dispatch and sync (H200: 2d-nat's forward timed 0.27 ms that
    way against 0.14 ms batched, `benchmarks/results/h200_region_walk_2026-12-02`)."""
    jax.block_until_ready(fn(*args))  # compile + first run
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = time.perf_counter() - start
    inner = int(max(1, min(20, 0.02 / max(one, 1e-6))))
    return median_ms(fn, *args, warmup=1, repeats=repeats, inner=inner)


def run_problem(problem, repeats: int, memory_limit: int | None, variants=None) -> list[dict]:
    na_problem = problem.na_problem(jnp.bfloat16)
    q, k, v, dout = problem.inputs(jnp.bfloat16)
    rpb_shape = (problem.heads, *(2 * kk - 1 for kk in problem.kernel_size))
    rpb = 0.5 * jax.random.normal(jax.random.key(7), rpb_shape, jnp.float32)
    rows, results = [], {}
    for variant, backend, with_rpb in VARIANTS:
        if variant not in (variants or [v for v, _, _ in VARIANTS if v not in DIAGNOSTIC]):
            continue
        row = dict(problem=problem.name, variant=variant, backend=backend, rpb=with_rpb)
        rows.append(row)
        why = _skip_reason(backend, with_rpb, na_problem)
        if why:
            row["skipped"] = why
            _log(row)
            continue
        budget = bias_blocks.BLOCKS_BUDGET_BYTES
        if variant.endswith("-gather"):
            bias_blocks.BLOCKS_BUDGET_BYTES = 0  # read when the calls are traced (below)
        elif variant.endswith("-blocks"):
            bias_blocks.BLOCKS_BUDGET_BYTES = 2**62
        try:
            _time_variant(problem, backend, with_rpb, variant, row, results, (q, k, v, rpb, dout),
                          repeats, memory_limit)
        finally:
            bias_blocks.BLOCKS_BUDGET_BYTES = budget
    _derive(rows, results, problem)
    return rows


def _time_variant(problem, backend, with_rpb, variant, row, results, inputs, repeats, memory_limit):
    """Fills ``row`` (peak memory, medians, TFLOP/s, or why not) and ``results[variant]``."""
    q, k, v, rpb, dout = inputs
    fwd, grads = _calls(_na(problem, backend, with_rpb), with_rpb)
    args_fwd, args_bwd = (q, k, v, rpb), (q, k, v, rpb, dout)
    try:
        row["fwd_peak_bytes"] = _peak_bytes(fwd, args_fwd)
        row["fwd_bwd_peak_bytes"] = _peak_bytes(grads, args_bwd)
        need = row["fwd_bwd_peak_bytes"]
        if memory_limit and need and need > memory_limit:
            row["skipped"] = (f"does not fit: forward+backward needs {need / 2**30:.1f} GiB of "
                              f"{memory_limit / 2**30:.1f} GiB")
            _log(row)
            return
        out, got = fwd(*args_fwd), grads(*args_bwd)
        if with_rpb:
            results[variant] = (out, *got)
        row["fwd_ms"] = round(_median_ms(fwd, args_fwd, repeats), 4)
        row["fwd_bwd_ms"] = round(_median_ms(grads, args_bwd, repeats), 4)
    except Exception as e:  # noqa: BLE001 - reported in the row (out of memory, compile errors)
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        traceback.print_exc()
        _log(row)
        return
    row["fwd_tflops"] = round(problem.forward_flops / row["fwd_ms"] / 1e9, 2)
    row["fwd_bwd_tflops"] = round(3.5 * problem.forward_flops / row["fwd_bwd_ms"] / 1e9, 2)
    _log(row)


def _derive(rows, results, problem):
    """The rpb overhead per backend, the speedup over unfused+rpb, agreement with the baseline."""
    timed = {r["variant"]: r for r in rows if "fwd_ms" in r}
    unfused = timed.get("unfused+rpb")
    for r in rows:
        if "fwd_ms" not in r:
            continue
        plain = timed.get(r["backend"]) if r["rpb"] else None  # same backend without rpb
        if plain is not None:
            r["rpb_overhead_fwd"] = round(r["fwd_ms"] / plain["fwd_ms"], 3)
            r["rpb_overhead_fwd_bwd"] = round(r["fwd_bwd_ms"] / plain["fwd_bwd_ms"], 3)
        if unfused is not None and r is not unfused:
            r["speedup_vs_unfused_fwd"] = round(unfused["fwd_ms"] / r["fwd_ms"], 2)
            r["speedup_vs_unfused_fwd_bwd"] = round(unfused["fwd_bwd_ms"] / r["fwd_bwd_ms"], 2)
        r["fwd_floor_ms"] = problem.floor_ms("fwd")
        r["fwd_bwd_floor_ms"] = problem.floor_ms("fwd_bwd")
        if r["rpb"] and BASELINE in results and r["variant"] != BASELINE:
            names = ("out", "dq", "dk", "dv", "d_rpb")
            r["rel_l2_vs_baseline"] = {n: float(f"{_rel_l2(a, b):.2g}")
                                       for n, a, b in zip(names, results[r["variant"]], results[BASELINE])}


def markdown(rows, device: str) -> str:
    fmt = lambda x, f="{:.4g}": "-" if x is None else f.format(x)
    mib = lambda b: "-" if b is None else f"{b / 2**20:.1f}"
    lines = [f"Relative positional bias inside the fused kernels, {device}, jax {jax.__version__}, bf16 "
             f"(rpb float32)", "",
             "| problem | variant | fwd ms (TF/s) | fwd+bwd ms (TF/s) | rpb overhead fwd / fwd+bwd "
             "| speedup vs unfused+rpb fwd / fwd+bwd | peak MiB fwd / fwd+bwd | floor ms fwd / fwd+bwd "
             "| max rel L2 vs fused-triton+rpb |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "fwd_ms" not in r:
            lines.append(f"| {r['problem']} | {r['variant']} | {r.get('skipped') or r.get('error')} "
                         "| | | | | | |")
            continue
        agree = r.get("rel_l2_vs_baseline")
        lines.append(
            f"| {r['problem']} | {r['variant']} | {r['fwd_ms']:.4f} ({r['fwd_tflops']}) "
            f"| {r['fwd_bwd_ms']:.4f} ({r['fwd_bwd_tflops']}) "
            f"| {fmt(r.get('rpb_overhead_fwd'))} / {fmt(r.get('rpb_overhead_fwd_bwd'))} "
            f"| {fmt(r.get('speedup_vs_unfused_fwd'))} / {fmt(r.get('speedup_vs_unfused_fwd_bwd'))} "
            f"| {mib(r.get('fwd_peak_bytes'))} / {mib(r.get('fwd_bwd_peak_bytes'))} "
            f"| {fmt(r.get('fwd_floor_ms'))} / {fmt(r.get('fwd_bwd_floor_ms'))} "
            f"| {'-' if not agree else f'{max(agree.values()):.1e}'} |")
    return "\n".join(lines) + "\n"


def _memory_limit() -> int | None:
    """90% of the device's allocator limit (None on a CPU: no limit checked)."""
    try:
        return int(0.9 * jax.devices()[0].memory_stats()["bytes_limit"])
    except Exception:  # noqa: BLE001 - CPU devices have no memory stats
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--names", default=DEFAULT_NAMES, help="comma-separated problem names")
    parser.add_argument("--repeats", type=int, default=20, help="timed samples per median")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated subset of {','.join(v for v, _, _ in VARIANTS)} (default: all but "
                             f"{', '.join(DIAGNOSTIC)})")
    parser.add_argument("--out", default=None, help="directory for rpb_bench.{json,md}")
    args = parser.parse_args(argv)
    variants = None if args.variants is None else args.variants.split(",")
    unknown = sorted(set(variants or ()) - {v for v, _, _ in VARIANTS})
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}")
    problems = {p.name: p for s in SETS for p in problem_sets.load(s)}
    names = args.names.split(",")
    missing = [n for n in names if n not in problems]
    if missing:
        raise SystemExit(f"--names: unknown problems {missing}")
    bad = [n for n in names if any(s != 1 for s in problems[n].stride) or any(problems[n].is_causal)]
    if bad:
        raise SystemExit(f"--names: rpb needs stride 1 and no causal axis: {bad}")
    memory_limit = _memory_limit()
    rows = []
    for name in names:
        rows += run_problem(problems[name], args.repeats, memory_limit, variants)
    device = jax.devices()[0].device_kind
    text = markdown(rows, device)
    print(text)
    if args.out:
        harness.write_results(args.out, "rpb_bench", rows, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
