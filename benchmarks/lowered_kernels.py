"""Lower every GPU kernel of jna for CUDA on this machine (no GPU needed) and fingerprint it.

    python -m benchmarks lowered --out lowered.json            # dump
    python -m benchmarks lowered --compare before.json after.json

For each public problem (``configs/problems/public.json``) and each Pallas backend that supports
it (fused-mosaic: bf16, head dim 64/128; fused-triton and unfused: bf16 and float32), the
forward and backward kernels (a VJP of out and lse) are lowered for CUDA at the tiles the backend
would choose on an H200 (the shipped tuned table, `jna.tuning.tables`), and the StableHLO module is
hashed with its source locations stripped (`jna._src.compat.lowering_without_source_locations`):
Mosaic GPU checks layouts, wgmma shapes, TMA boxes and the SMEM budget while lowering, and the
Triton lowering checks Triton's shape rules. Two dumps with equal hashes mean the kernels that
would run on the GPU are the same bytes; a commit that only moves code keeps every hash.

Under another jax version the hashes differ (the lowering itself changes); there the dump shows
that every kernel still lowers. Unfused problems whose logits would not fit a GPU are lowered
all the same: lowering allocates nothing.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
from jax import export

from jna import backends
from jna._src import compat
from jna.tuning import problem_sets
from jna.tuning import tables as tuned
from jna.backends.mosaic import op as fused_mosaic
from jna.backends.triton import fused as fused_triton
from jna.backends.triton import unfused as unfused

DEVICE_KIND = "NVIDIA H200"  # whose tuned tiles to lower at
TRITON_CALL = "__gpu$xla.gpu.triton"


def _grads_of(attention, problem):
    """A function of (q, k, v) returning the VJP of the backend's (out, lse) (all three passes)."""
    def fn(q, k, v):
        (out, lse), vjp = jax.vjp(lambda q, k, v: attention(q, k, v, problem), q, k, v)
        return vjp((out, lse))
    return fn


def _args(problem):
    shape = lambda heads, dim: jax.ShapeDtypeStruct(
        (problem.batch, *problem.spatial_shape, heads, dim), problem.dtype)
    return (shape(problem.heads, problem.head_dim), shape(problem.kv_heads, problem.head_dim),
            shape(problem.kv_heads, problem.value_dim))


def _lower_mosaic(problem) -> tuple[str, str]:
    config = fused_mosaic.default_config(problem)
    text = fused_mosaic.lower_for_gpu(problem, config, backward=True).as_text()
    return text, repr(config)


def _lower_triton(module, problem) -> tuple[str, str]:
    config = module.default_config(problem)
    original = module._interpret
    module._interpret = lambda: False  # lower the GPU kernels, not the interpreter
    try:
        with compat.triton_lowering_for_cuda(90):
            exported = export.export(
                jax.jit(_grads_of(module.attention, problem)), platforms=["cuda"],
                disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*_args(problem))
    finally:
        module._interpret = original
    return exported.mlir_module(), repr(config)


LOWER = {
    "fused-mosaic": (_lower_mosaic, ("bfloat16",)),
    "fused-triton": (lambda p: _lower_triton(fused_triton, p), ("bfloat16", "float32")),
    "unfused": (lambda p: _lower_triton(unfused, p), ("bfloat16", "float32")),
}


@contextlib.contextmanager
def _tiles_of(device_kind: str):
    """Config choice as on ``device_kind`` (its shipped tuned table), whatever this machine is."""
    original = tuned.device_slug
    tuned.device_slug = lambda kind=None: original(device_kind if kind is None else kind)
    try:
        yield
    finally:
        tuned.device_slug = original


def lower_one(name: str, backend: str, dtype: str) -> dict:
    """One case's row: its config, kernel count and hash, or why it was skipped or failed."""
    p = next(p for p in problem_sets.load("public") if p.name == name)
    problem = p.na_problem(jnp.dtype(dtype))
    row = dict(problem=name, backend=backend, dtype=dtype)
    why = backends.get(backend).supports(problem)
    if why is not None:
        return dict(row, skipped=why)
    start = time.perf_counter()
    try:
        with _tiles_of(DEVICE_KIND), compat.lowering_without_source_locations():
            text, config = LOWER[backend][0](problem)
    except Exception as e:  # report every case, then fail
        return dict(row, error=f"{type(e).__name__}: {str(e)[:500]}")
    kernels = text.count("custom_call @mosaic_gpu") if backend == "fused-mosaic" else text.count(TRITON_CALL)
    return dict(row, config=config, kernels=kernels, sha256=hashlib.sha256(text.encode()).hexdigest(),
                seconds=round(time.perf_counter() - start, 1))


def _lower_in_subprocess(case) -> dict:
    # A fresh process per case: Mosaic GPU's serialized kernels depend on what the process
    # lowered before (the same kernel lowered after another one hashes differently).
    proc = subprocess.run([sys.executable, "-m", "benchmarks.lowered_kernels", "--one", *case],
                          capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return dict(problem=case[0], backend=case[1], dtype=case[2],
                    error=f"subprocess rc {proc.returncode}: {proc.stderr[-500:]}")
    return json.loads(lines[-1])


def dump(backends, names=None, workers: int = 2) -> dict:
    cases = [(p.name, backend, dtype) for p in problem_sets.load("public")
             if not names or p.name in names for backend in backends for dtype in LOWER[backend][1]]
    rows = []
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for row in pool.map(_lower_in_subprocess, cases):
            rows.append(row)
            what = (f"{row['kernels']} kernels {row['sha256'][:12]} {row['config']}" if "sha256" in row
                    else row.get("skipped") or "ERROR " + row["error"][:300])
            print(f"{row['problem']:16s} {row['backend']:13s} {row['dtype']:9s} {what}",
                  file=sys.stderr, flush=True)
    return {"jax": jax.__version__, "device_tiles": DEVICE_KIND, "rows": rows}


def compare(a: dict, b: dict) -> int:
    key = lambda r: (r["problem"], r["backend"], r["dtype"])
    left, right = {key(r): r for r in a["rows"]}, {key(r): r for r in b["rows"]}
    same = differ = 0
    for k in sorted(set(left) | set(right)):
        x, y = left.get(k, {}), right.get(k, {})
        if x.get("sha256") and x.get("sha256") == y.get("sha256"):
            same += 1
        else:
            differ += 1
            print(f"DIFFERS {' '.join(k)}: {x.get('sha256', x.get('error', x.get('skipped')))} "
                  f"vs {y.get('sha256', y.get('error', y.get('skipped')))}")
    print(f"{same} identical, {differ} different (jax {a['jax']} vs {b['jax']})")
    return 1 if differ else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the dump here (JSON)")
    parser.add_argument("--backends", default=",".join(LOWER))
    parser.add_argument("--names", help="comma-separated public problem names (default: all)")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two dumps")
    parser.add_argument("--workers", type=int, default=2, help="cases lowered at once")
    parser.add_argument("--one", nargs=3, metavar=("PROBLEM", "BACKEND", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(lower_one(*args.one)))
        return 0
    if args.compare:
        a, b = (json.load(open(path)) for path in args.compare)
        return compare(a, b)
    result = dump(args.backends.split(","), args.names.split(",") if args.names else None, args.workers)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    errors = [r for r in result["rows"] if "error" in r]
    lowered = [r for r in result["rows"] if "sha256" in r]
    print(f"jax {result['jax']}: {len(lowered)} lowered, {len(errors)} failed, "
          f"{len(result['rows']) - len(lowered) - len(errors)} not supported by the backend")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
