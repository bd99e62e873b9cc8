"""GPU check in one call: the GPU test subset, a memory check, and the benchmark table.

    python -m benchmarks gpu-check --out $OUT [--skip-tests] [--problems 2d-nat,1d-long]
                                   [--backends fused-triton] [--budget-s 20]

Writes ``gpu_check.json`` and ``gpu_check.md`` (device, jax version, date, commit) to ``--out``
and prints the markdown table last. Commit them under ``benchmarks/results/``.

Timing: median of repeated synchronized batches after warm-up (`jna.tuning.timing.median_ms`), on
random inputs; speedups are over cuDNN dense attention measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import time
import traceback


import jax

from benchmarks import harness
from benchmarks import problems as problem_sets

# Problems whose reference backend is timed too (the "naive" baseline; large ones take minutes).
REFERENCE_PROBLEMS = ("2d-nat", "2d-dinat")


def _log(*args):
    print(*args, flush=True)


def run_tests(out: pathlib.Path, backends: str, timeout_s: int = 330, workers: int = 1) -> dict:
    """The GPU test subset: the oracle sweep and the large-shape checks for the chosen backends.

    ``workers > 1`` runs pytest-xdist workers side by side on the one GPU (the tests are small
    and compile-bound); each worker then allocates GPU memory on demand instead of taking 75%.
    """
    env = dict(os.environ, JNA_TEST_BACKENDS=backends)
    # The backends' own tests (`jna_tests/backend_test_base.py`, one test_backend_<name>.py each;
    # JNA_TEST_BACKENDS narrows them) and the large-shape checks.
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           *sorted(str(p) for p in pathlib.Path("jna_tests").glob("test_backend_*.py")),
           "jna_tests/test_gpu.py"]
    if workers > 1:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        cmd += ["-n", str(workers)]
    start = time.time()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        (out / "gpu_tests.log").write_text(f"timed out after {timeout_s} s\n{e.stdout or ''}")
        return {"returncode": 124, "summary": f"timed out after {timeout_s} s", "seconds": timeout_s}
    (out / "gpu_tests.log").write_text(proc.stdout + proc.stderr)
    summary = [l for l in proc.stdout.splitlines() if " passed" in l or " failed" in l or "error" in l]
    result = {"returncode": proc.returncode, "summary": summary[-1] if summary else proc.stdout[-500:],
              "seconds": round(time.time() - start, 1), "backends": backends}
    _log("tests:", result)
    return result


def memory_check(problem, backend: str) -> dict:
    """Compiled temp bytes of forward and forward+backward, against the input size."""
    q, k, v, dout = problem.inputs()
    fn = harness.na_function(problem, backend)
    input_bytes = 3 * q.size * q.dtype.itemsize
    fwd = jax.jit(fn).lower(q, k, v).compile().memory_analysis()
    bwd = harness.fwd_bwd(fn).lower(q, k, v, dout).compile().memory_analysis()
    result = {
        "problem": problem.name,
        "backend": backend,
        "input_bytes": int(input_bytes),
        "forward_temp_bytes": int(fwd.temp_size_in_bytes),
        "fwd_bwd_temp_bytes": int(bwd.temp_size_in_bytes),
        "n_squared_bytes": int(problem.batch * problem.heads * problem.tokens ** 2 * 4),
    }
    _log("memory:", result)
    return result


def benchmark(problem, backends: list[str], budget_s: float) -> list[dict]:
    q, k, v, dout = problem.inputs()
    rows = []
    candidates = {"cudnn-dense": harness.dense_attention}
    for name in backends:
        candidates[name] = harness.na_function(problem, name)
    if problem.name in REFERENCE_PROBLEMS and "reference" not in backends:
        candidates["reference"] = harness.na_function(problem, "reference")
    for name, fn in candidates.items():
        row = {"problem": problem.name, "backend": name}
        for mode, compiled, args in (("fwd", jax.jit(fn), (q, k, v)), ("fwd_bwd", harness.fwd_bwd(fn), (q, k, v, dout))):
            try:
                row[f"{mode}_ms"] = round(harness.time_ms(compiled, args, budget_s), 4)
            except Exception as e:  # noqa: BLE001 - report (e.g. out of memory), keep going
                row[f"{mode}_ms"] = None
                row[f"{mode}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                traceback.print_exc()
        if name in ("fused-triton", "fused-mosaic"):
            row["tiles"] = harness.tiles_used(problem, name)
        rows.append(row)
        _log(row)
    dense = rows[0]
    for row in rows:
        for mode, factor in (("fwd", 1.0), ("fwd_bwd", 3.5)):
            t = row.get(f"{mode}_ms")
            if t:
                row[f"{mode}_tflops"] = round(problem.forward_flops * factor / (t * 1e-3) / 1e12, 1)
                if dense.get(f"{mode}_ms"):
                    row[f"{mode}_speedup_vs_cudnn"] = round(dense[f"{mode}_ms"] / t, 2)
    return rows


def _markdown(meta: dict, rows: list[dict], memory: list[dict], tests: dict | None) -> str:
    lines = [
        "# jna GPU check",
        "",
        f"- device: {meta['device']}",
        f"- jax: {meta['jax']}; date: {meta['date']}; commit: {meta['commit']}",
        "- dtype: bfloat16; effective TFLOP/s: fwd = 4*B*H*N*prod(K)*D, fwd+bwd = 3.5x",
    ]
    if tests:
        lines.append(f"- GPU tests ({tests.get('backends', '')}: test_backend_*.py + test_gpu.py): "
                     f"{tests['summary']} (exit {tests['returncode']}, {tests['seconds']} s)")
    lines += [
        "",
        "| problem | backend | tiles | fwd ms | fwd TFLOP/s | fwd vs cuDNN | fwd+bwd ms | fwd+bwd TFLOP/s | fwd+bwd vs cuDNN |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda x: "-" if x is None else str(x)
    for r in rows:
        lines.append(
            f"| {r['problem']} | {r['backend']} | {r.get('tiles', '')} | {fmt(r.get('fwd_ms'))} | {fmt(r.get('fwd_tflops'))} | "
            f"{fmt(r.get('fwd_speedup_vs_cudnn'))} | {fmt(r.get('fwd_bwd_ms'))} | "
            f"{fmt(r.get('fwd_bwd_tflops'))} | {fmt(r.get('fwd_bwd_speedup_vs_cudnn'))} |"
        )
    for m in memory:
        lines.append("")
        lines.append(
            f"Memory ({m['problem']}, {m.get('backend', '?')}): inputs {m['input_bytes'] / 2**20:.0f} MiB; compiled temp "
            f"forward {m['forward_temp_bytes'] / 2**20:.0f} MiB, forward+backward "
            f"{m['fwd_bwd_temp_bytes'] / 2**20:.0f} MiB (an N^2 fp32 score matrix: "
            f"{m['n_squared_bytes'] / 2**30:.0f} GiB)."
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--problems", default="", help="comma-separated names (default: all public)")
    parser.add_argument("--backends", default="fused-triton", help="backends to benchmark")
    parser.add_argument("--test-backends", default="", help="backends to test (default: --backends)")
    parser.add_argument("--test-workers", type=int, default=1, help="pytest-xdist workers on the GPU")
    parser.add_argument("--test-timeout-s", type=int, default=330)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--memory-problem", default="2d-flux")
    parser.add_argument("--budget-s", type=float, default=15.0, help="timing budget per measurement")
    args = parser.parse_args()

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = jax.devices()[0]
    meta = {
        "device": f"{device.device_kind} ({device.platform})",
        "jax": jax.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": os.environ.get("JNA_COMMIT", "unknown"),
    }
    _log(meta)
    backends = [b for b in args.backends.split(",") if b]
    tests = None if args.skip_tests else run_tests(
        out, args.test_backends or args.backends, args.test_timeout_s, args.test_workers)

    selected = [p for p in problem_sets.load() if not args.problems or p.name in args.problems.split(",")]
    memory, rows = [], []
    if not args.skip_bench:
        mem_problem = [p for p in problem_sets.load() if p.name == args.memory_problem]
        for p in mem_problem:
            for b in backends:
                try:
                    memory.append(memory_check(p, b))
                except Exception:  # noqa: BLE001
                    traceback.print_exc()
        for p in selected:
            rows += benchmark(p, backends, args.budget_s)

    (out / "gpu_check.json").write_text(json.dumps({"meta": meta, "tests": tests, "memory": memory,
                                                    "rows": rows}, indent=1))
    md = _markdown(meta, rows, memory, tests)
    (out / "gpu_check.md").write_text(md)
    print(md)
    return 0 if (tests is None or tests["returncode"] == 0) else 1


if __name__ == "__main__":
    sys.exit(main())
