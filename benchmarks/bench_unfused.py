"""Unfused (GEMM-based) NA against the naive baseline: issue 5's performance bar.

    python -m benchmarks unfused [--out DIR] [--problems 1d-long,2d-nat] [--dtypes float32,bfloat16]
                                       [--mem-limit-gb 60] [--budget-s 10] [--tiny]

For the rank-1 and rank-2 problems of the public problem set (`configs/problems/public.json`,
the same as ``../shared/problems.json``), times the forward pass of ``jna.na*d`` with
``backend="unfused"`` (QK kernel -> float32 softmax -> AV kernel) and with
``backend="reference"`` (the naive gather baseline), in float32 and bfloat16, and reports the
speedup (with the default tiling; a few other tilings are timed too, for information). The bar (the seed paper's GEMM-vs-naive averages): float32 >= 9.95x (1-D) and >= 3.72x
(2-D); half precision >= 5.96x (1-D) and >= 2.13x (2-D), averaged over the problems that fit.

Problems whose unfused forward would not fit in ``--mem-limit-gb`` (float32 logits and weights,
``2 * B * N * H * prod(K) * 4`` bytes, plus q/k/v/out) are skipped and reported as such.
Timing: `jna.tuning.timing.median_ms` (synchronized batches after warm-up) on random inputs.

Writes ``bench_unfused.json`` and ``bench_unfused.md`` into ``--out`` (default ``$OUT`` or
``benchmarks/results``) and prints the markdown table last. ``--tiny`` runs two small problems
(for a CPU smoke test; the unfused kernels then run in Pallas interpret mode).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import pathlib
import statistics
import sys
import time
import traceback


import jax
import jax.numpy as jnp

import jna
from benchmarks import problems as problem_sets
from jna.backends.triton import unfused as unfused
from jna.backends.triton.fused import TritonConfig
from jna.backends.tiling import axis_caps, tile_efficiency, tile_shapes
from jna.tuning.timing import median_ms

# (rank, dtype kind) -> minimum average speedup of unfused over reference (issue 5).
BAR = {(1, "float32"): 9.95, (2, "float32"): 3.72, (1, "half"): 5.96, (2, "half"): 2.13}

TINY = [
    problem_sets.Problem("tiny-1d", 1, 2, 16, (64,), (7,), (1,), (1,), (False,)),
    problem_sets.Problem("tiny-2d", 1, 2, 16, (12, 12), (5, 5), (1, 1), (1, 1), (False, False)),
]


def _log(*args):
    print(*args, flush=True)


def unfused_bytes(p: problem_sets.Problem, dtype) -> int:
    """Peak-ish bytes of the unfused forward: float32 logits + weights, q/k/v/out."""
    slots = p.batch * p.tokens * p.heads * math.prod(p.kernel_size)
    return 2 * slots * 4 + 4 * p.batch * p.tokens * p.heads * p.head_dim * jnp.dtype(dtype).itemsize


def _time(fn, args, budget_s: float) -> float:
    """Median ms, with a repeat count that fits ``budget_s``.

    Slow calls (the reference baseline on the large problems takes seconds) get fewer samples:
    at least two timed calls after the compiling one.
    """
    jax.block_until_ready(fn(*args))  # compile + first run
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = time.perf_counter() - start
    if one > budget_s / 4:
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        return 1e3 * statistics.median([one, time.perf_counter() - start])
    repeats = int(max(3, min(30, budget_s / max(one, 1e-4) / 2)))
    inner = int(max(1, min(20, 0.02 / max(one, 1e-6))))
    return median_ms(fn, *args, warmup=1, repeats=repeats, inner=inner)


def _params(p: problem_sets.Problem):
    return jna.semantics.normalize_params(p.shape, p.kernel_size, p.stride, p.dilation, p.is_causal)


def _describe(p: problem_sets.Problem, cfg: TritonConfig) -> str:
    eff = tile_efficiency(_params(p), cfg.q_tile, cfg.kv_tile)
    return f"q{'x'.join(map(str, cfg.q_tile))} kv{'x'.join(map(str, cfg.kv_tile))} eff {eff:.2f}"


def candidate_configs(p: problem_sets.Problem) -> list[TritonConfig]:
    """Other tilings worth timing: the most efficient with 16 and with 32 tokens per tile."""
    params = _params(p)
    caps = axis_caps(params)
    out = []
    for tokens in (16, 32):
        shapes = list(tile_shapes(tokens, caps))
        if not shapes:
            continue
        best = max(((a, b) for a in shapes for b in shapes),
                   key=lambda ab: tile_efficiency(params, ab[0], ab[1]))
        out.append(TritonConfig(best[0], best[1], num_warps=4, num_stages=2))
    return out


def bench_problem(p: problem_sets.Problem, dtype, budget_s: float, mem_limit: float,
                  candidates: bool = True) -> dict:
    name = jnp.dtype(dtype).name
    row = {"problem": p.name, "rank": len(p.shape), "dtype": name,
           "unfused_gb": round(unfused_bytes(p, dtype) / 1e9, 2)}
    if unfused_bytes(p, dtype) > mem_limit:
        row["skipped"] = f"unfused logits+weights need {row['unfused_gb']} GB > {mem_limit / 1e9:.0f} GB"
        _log(row)
        return row
    q, k, v, _ = p.inputs(dtype)
    outputs = {}
    for backend in ("unfused", "reference"):
        fn = jax.jit(functools.partial(jna.neighborhood_attention, backend=backend, **p.na_kwargs))
        try:
            row[f"{backend}_ms"] = round(_time(fn, (q, k, v), budget_s), 4)
            row[f"{backend}_tflops"] = float(f"{p.forward_flops / (row[f'{backend}_ms'] * 1e-3) / 1e12:.3g}")
            outputs[backend] = fn(q, k, v).astype(jnp.float32)
        except Exception as e:  # noqa: BLE001 - report (e.g. out of memory), keep going
            row[f"{backend}_ms"] = None
            row[f"{backend}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            traceback.print_exc()
    if len(outputs) == 2:
        # A sanity check that the timed configuration computes NA (the oracle tests are elsewhere):
        # relative L2 distance of the two backends' outputs.
        u, r = outputs["unfused"], outputs["reference"]
        row["rel_l2_vs_reference"] = float(f"{float(jnp.linalg.norm(u - r) / jnp.linalg.norm(r)):.3g}")
    del outputs
    if row.get("unfused_ms") and row.get("reference_ms"):
        row["speedup"] = round(row["reference_ms"] / row["unfused_ms"], 2)
    problem = jna._src.arguments.check_call(q, k, v, *p.na_kwargs.values(), None, None, None, None)
    row["tiles"] = _describe(p, unfused.default_config(problem))
    if jna.tuning.tables.exact(unfused.NAME, problem.params, max(problem.head_dim, problem.value_dim), name):
        row["tiles"] += " (tuned)"
    if candidates and row.get("unfused_ms"):
        # Other tilings, to show whether the default choice leaves speed behind (not the bar).
        best = (row["unfused_ms"], row["tiles"])
        for cfg in candidate_configs(p):
            fn = jax.jit(functools.partial(jna.neighborhood_attention, backend=unfused.Unfused(cfg),
                                           **p.na_kwargs))
            try:
                ms = round(_time(fn, (q, k, v), budget_s), 4)
            except Exception as e:  # noqa: BLE001
                _log(f"candidate {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                continue
            if ms < best[0]:
                best = (ms, _describe(p, cfg))
        row["best_candidate_ms"], row["best_candidate_tiles"] = best
        if row.get("reference_ms"):
            row["best_candidate_speedup"] = round(row["reference_ms"] / best[0], 2)
    _log(row)
    return row


def _default_mem_limit(device) -> float:
    """60% of the device's memory (the unfused forward also holds inputs, and the reference its
    gathered chunks), or 60 GB where the device does not say (CPU)."""
    try:
        limit = device.memory_stats()["bytes_limit"]
    except Exception:  # noqa: BLE001 - CPU devices have no memory stats
        return 60e9
    return 0.6 * limit


def summarize(rows: list[dict]) -> list[dict]:
    """Average speedup per (rank, dtype kind) against the bar."""
    out = []
    for (rank, kind), bar in BAR.items():
        speedups = [r["speedup"] for r in rows if r.get("speedup") is not None and r["rank"] == rank
                    and (r["dtype"] == "float32") == (kind == "float32")]
        avg = round(statistics.mean(speedups), 2) if speedups else None
        out.append({"rank": rank, "dtype": kind, "problems": len(speedups), "avg_speedup": avg,
                    "bar": bar, "meets_bar": None if avg is None else avg >= bar})
    return out


def markdown(meta: dict, rows: list[dict], summary: list[dict]) -> str:
    fmt = lambda x: "-" if x is None else str(x)
    lines = [
        "# Unfused (GEMM) NA vs the naive reference backend, forward",
        "",
        f"- device: {meta['device']}; jax {meta['jax']}; {meta['date']}; commit {meta['commit']}",
        "- unfused = QK kernel -> float32 softmax -> AV kernel (`backend=\"unfused\"`);"
        " reference = gather-based jax.numpy (`backend=\"reference\"`)",
        "- effective TFLOP/s = 4*B*H*N*prod(K)*D / time",
        "",
        "| problem | dtype | tiles | unfused ms | unfused TFLOP/s | reference ms | speedup | rel. L2 vs reference | fastest tiling timed (ms, speedup) | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        note = r.get("skipped") or r.get("unfused_error") or r.get("reference_error") or ""
        best = ""
        if r.get("best_candidate_ms") is not None:
            best = (f"{r['best_candidate_tiles']}: {r['best_candidate_ms']} ms, "
                    f"{fmt(r.get('best_candidate_speedup'))}x")
        lines.append(f"| {r['problem']} | {r['dtype']} | {r.get('tiles', '')} | {fmt(r.get('unfused_ms'))} | "
                     f"{fmt(r.get('unfused_tflops'))} | {fmt(r.get('reference_ms'))} | "
                     f"{fmt(r.get('speedup'))} | {fmt(r.get('rel_l2_vs_reference'))} | {best} | {note} |")
    lines += ["", "| rank | dtype | problems | average speedup | bar | meets bar |", "|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['rank']}-D | {s['dtype']} | {s['problems']} | {fmt(s['avg_speedup'])} | "
                     f">= {s['bar']}x | {fmt(s['meets_bar'])} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--problems", default="", help="comma-separated names (default: all rank 1-2)")
    parser.add_argument("--problem-file", default="public", help="a shipped set name or a JSON path")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--mem-limit-gb", type=float, default=None,
                        help="default: 60%% of the device's memory (60 GB where it is unknown)")
    parser.add_argument("--budget-s", type=float, default=10.0, help="timing budget per measurement")
    parser.add_argument("--tiny", action="store_true", help="two small problems (CPU smoke test)")
    parser.add_argument("--no-candidates", action="store_true",
                        help="time only the default tiling (skip the candidate tilings)")
    args = parser.parse_args()

    if args.tiny:
        problems = TINY
    else:
        problems = [p for p in problem_sets.load(args.problem_file) if len(p.shape) <= 2]
    if args.problems:
        problems = [p for p in problems if p.name in args.problems.split(",")]
    dtypes = [jnp.dtype(d) for d in args.dtypes.split(",") if d]

    device = jax.devices()[0]
    meta = {
        "device": f"{device.device_kind} ({device.platform})",
        "jax": jax.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": os.environ.get("JNA_COMMIT", "unknown"),
        "tiny": args.tiny,
    }
    _log(meta)
    mem_limit = args.mem_limit_gb * 1e9 if args.mem_limit_gb else _default_mem_limit(device)
    meta["mem_limit_gb"] = round(mem_limit / 1e9, 1)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for d in dtypes:
        for p in problems:
            rows.append(bench_problem(p, d, args.budget_s, mem_limit, not args.no_candidates))
            # Written after every row: a run cut short keeps what it measured.
            summary = summarize(rows)
            (out / "bench_unfused.json").write_text(json.dumps(
                {"meta": meta, "rows": rows, "summary": summary,
                 "problems": [dataclasses.asdict(p) for p in problems]}, indent=1))
            md = markdown(meta, rows, summary)
            (out / "bench_unfused.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
