"""The jna benchmark CLI: problem sets x backends x modes x dtypes, against dense attention.

    python -m benchmarks run [--problems public,paper_sweeps,models] [--names 2d-nat,...]
        [--backends auto,fused-triton] [--baseline auto|none] [--modes fwd,fwd_bwd]
        [--dtypes bfloat16] [--budget-s 2] [--out benchmarks/results/bench] [--plot]

``--problems``: names of files in ``configs/problems/`` (``public`` is ``../shared/problems.json``'s
set; ``paper_sweeps`` the seed paper's kernel-size sweeps; ``models`` NAT/DiNAT layers; ``tiny``
a CPU smoke test) or paths to other problem-set files; by default the first three on a GPU and
``tiny`` elsewhere. Each NA row also gets its memory floor (`Problem.floor_ms`) where the device's
bandwidth is known. Each (problem, dtype) runs the dense
baseline (cuDNN's fused attention on an NVIDIA GPU, XLA's elsewhere; ``--baseline none`` skips it)
and every backend of ``--backends``, forward and/or forward+backward.

Cells that do not fit in device memory (XLA's compiled memory analysis, before running) or run
out of memory are reported as such; a backend that does not support a problem is reported too.
Progress (cell k of n, elapsed, estimated remaining) goes to stderr.

Writes ``bench.json`` and ``bench.md`` (device, jax version, date, commit) into ``--out``, and with
``--plot`` (needs matplotlib: ``pip install -e '.[plot]'``) one PNG per sweep rank: latency and
speedup over the dense baseline vs kernel size, one curve per backend and mode.
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


import jax
import jax.numpy as jnp

from benchmarks import harness
from benchmarks import problems as problem_sets

REPO = pathlib.Path(__file__).resolve().parents[1]
# The default GPU run: the public problems, the seed paper's kernel-size sweeps, NAT/DiNAT layers.
GPU_DEFAULT_SETS = "public,paper_sweeps,models"


def _progress(*args):
    print(*args, file=sys.stderr, flush=True)


def resolve_problem_files(spec: str) -> list[str]:
    """Problem-set names (`jna.tuning.problem_sets.set_names`) or paths of JSON files."""
    files = []
    for item in (s for s in spec.split(",") if s):
        if item not in problem_sets.set_names() and not pathlib.Path(item).is_file():
            known = ", ".join(problem_sets.set_names())
            raise SystemExit(f"--problems: no problem set {item!r} (known: {known}, or a path)")
        files.append(item)
    return files


def commit() -> str:
    """The git commit being measured (``JNA_COMMIT`` where there is no repository, e.g. a GPU box)."""
    if os.environ.get("JNA_COMMIT"):
        return os.environ["JNA_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def check_against_reference(problem, backend: str, args) -> float | None:
    """Relative L2 distance of ``backend``'s forward output from the reference backend's, or None
    where the naive reference would be too slow (over 1 effective TFLOP) or fails."""
    if problem.forward_flops > 1e12 or backend in ("reference",):
        return None
    q, k, v, _ = args
    try:
        got = jax.jit(harness.na_function(problem, backend))(q, k, v).astype(jnp.float32)
        want = jax.jit(harness.na_function(problem, "reference"))(q, k, v).astype(jnp.float32)
        return float(f"{float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)):.3g}")
    except Exception:  # noqa: BLE001 - the timing cells report errors
        return None


def run(problems, backends: list[str], baseline: str | None, modes: list[str], dtypes, budget_s: float,
        memory_limit: int | None, on_row=None, check: bool = False) -> list[dict]:
    """All cells; one row per (problem, dtype, candidate) with per-mode ms or a reason.

    ``on_row(rows)`` is called after every row (the CLI saves partial results with it).
    ``check``: also record each backend's forward distance from the reference backend
    (``rel_l2_vs_reference``; small problems only), a sanity check of the configs timed."""
    names = ([baseline] if baseline else []) + backends
    total = len(problems) * len(dtypes) * len(names) * len(modes)
    done, start, rows = 0, time.time(), []
    for dtype in dtypes:
        for problem in problems:
            args = problem.inputs(dtype)
            dense = None
            for name in names:
                row = {"problem": problem.name, "sweep": problem.sweep, "rank": problem.rank,
                       "kernel_size": list(problem.kernel_size), "dtype": jnp.dtype(dtype).name,
                       "backend": name}
                for mode in modes:
                    cell = harness.measure(problem, name, mode, args, budget_s, memory_limit)
                    done += 1
                    elapsed = time.time() - start
                    eta = elapsed / done * (total - done)
                    shown = f"{cell['ms']:.3f} ms" if "ms" in cell else cell.get("skipped") or cell.get("error")
                    _progress(f"[{done}/{total}] {elapsed:6.0f}s, ~{eta:4.0f}s left | {problem.name} "
                              f"{row['dtype']} {name} {mode}: {shown}")
                    floor = problem.floor_ms(mode, dtype)
                    if floor is not None and name != baseline:
                        row[f"{mode}_floor_ms"] = float(f"{floor:.3g}")
                    if "ms" in cell:
                        row[f"{mode}_ms"] = cell["ms"]
                        row[f"{mode}_tflops"] = float(f"{harness.tflops(problem, mode, cell['ms']):.3g}")
                    elif "skipped" in cell:
                        row[f"{mode}_note"] = cell["skipped"]
                    else:
                        row[f"{mode}_error"] = cell["error"]
                if check and name != baseline:
                    row["rel_l2_vs_reference"] = check_against_reference(problem, name, args)
                if name == baseline:
                    dense = row
                elif dense is not None:
                    for mode in modes:
                        if row.get(f"{mode}_ms") and dense.get(f"{mode}_ms"):
                            row[f"{mode}_speedup"] = round(dense[f"{mode}_ms"] / row[f"{mode}_ms"], 2)
                rows.append(row)
                if on_row is not None:
                    on_row(rows)
            del args
    return rows


def markdown(meta: dict, rows: list[dict], modes: list[str]) -> str:
    fmt = lambda x: "-" if x is None else str(x)
    lines = ["# jna benchmark", "",
             f"- device: {meta['device']}; jax {meta['jax']}; jna {meta['jna']}; date {meta['date']}; "
             f"commit {meta['commit']}",
             f"- problem sets: {', '.join(meta['problem_files'])}; baseline: {meta['baseline'] or 'none'}",
             "- median of synchronized runs after warm-up, random inputs; TFLOP/s: forward "
             "4*B*H*N*prod(K)*D, forward+backward 3.5x that, jvp 3x; speedup = baseline ms / ms; floor = the "
             "memory floor (q, k, v, out, lse read or written once; the backward also dO and the "
             "gradients) at the device's attainable bandwidth", ""]
    head = ["problem", "dtype", "backend"]
    for mode in modes:
        label = harness.MODE_LABELS[mode]
        head += [f"{label} ms", f"{label} TFLOP/s", f"{label} speedup"]
        if any(f"{mode}_floor_ms" in r for r in rows):
            head.append(f"{label} floor ms")
    checked = any("rel_l2_vs_reference" in r for r in rows)
    if checked:
        head.append("rel. L2 vs reference")
    lines += ["| " + " | ".join(head) + " | note |", "|" + "---|" * (len(head) + 1)]
    for r in rows:
        cells = [r["problem"], r["dtype"], r["backend"]]
        for mode in modes:
            cells += [fmt(r.get(f"{mode}_ms")), fmt(r.get(f"{mode}_tflops")), fmt(r.get(f"{mode}_speedup"))]
            if any(f"{mode}_floor_ms" in x for x in rows):
                cells.append(fmt(r.get(f"{mode}_floor_ms")))
        if checked:
            cells.append(fmt(r.get("rel_l2_vs_reference")))
        note = "; ".join(f"{m}: {r.get(f'{m}_note') or 'ERROR ' + r[f'{m}_error']}" for m in modes
                         if r.get(f"{m}_note") or r.get(f"{m}_error"))
        lines.append("| " + " | ".join(cells) + f" | {note} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], modes: list[str], baseline: str | None, out: pathlib.Path, meta: dict) -> list[str]:
    """One PNG per (sweep rank, dtype): latency (log) and speedup vs kernel size. Returns paths."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _progress("--plot: matplotlib is not installed (pip install -e '.[plot]'); no plots")
        return []
    written = []
    swept = [r for r in rows if r.get("sweep")]
    for rank in sorted({r["rank"] for r in swept}):
        for dtype in sorted({r["dtype"] for r in swept if r["rank"] == rank}):
            sel = [r for r in swept if r["rank"] == rank and r["dtype"] == dtype]
            fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(11, 4.2))
            colors = {b: f"C{i}" for i, b in enumerate(dict.fromkeys(r["backend"] for r in sel))}
            for sweep in sorted({r["sweep"] for r in sel}):
                for backend in colors:
                    for mode in modes:
                        pts = sorted((r["kernel_size"][0], r.get(f"{mode}_ms"), r.get(f"{mode}_speedup"))
                                     for r in sel if r["sweep"] == sweep and r["backend"] == backend)
                        pts = [p for p in pts if p[1] is not None]
                        if not pts:
                            continue
                        label = f"{backend} {harness.MODE_LABELS[mode]}"
                        if len({r['sweep'] for r in sel}) > 1:
                            label = f"{sweep}: {label}"
                        style = "-o" if mode == "fwd" else "--s"
                        kw = dict(label=label, ms=4, color=colors[backend])
                        ax_t.plot([p[0] for p in pts], [p[1] for p in pts], style, **kw)
                        if backend != baseline and all(p[2] is not None for p in pts):
                            ax_s.plot([p[0] for p in pts], [p[2] for p in pts], style, **kw)
            ax_t.set(xscale="log", yscale="log", xlabel="kernel size (per axis)", ylabel="ms",
                     title=f"{rank}-D latency ({dtype})")
            ax_s.set(xscale="log", xlabel="kernel size (per axis)", ylabel=f"speedup over {baseline}",
                     title=f"{rank}-D speedup over {baseline} ({dtype})")
            ax_s.axhline(1.0, color="gray", lw=0.8)
            sizes = sorted({r["kernel_size"][0] for r in sel})
            for ax in (ax_t, ax_s):
                ax.set_xticks(sizes, [str(k) for k in sizes], minor=False)
                ax.set_xticks([], minor=True)
                ax.grid(True, which="both", alpha=0.3)
                if ax.lines:
                    ax.legend(fontsize=7)
            fig.suptitle(f"{meta['device']}, jax {meta['jax']}, commit {meta['commit']}", fontsize=8)
            fig.tight_layout()
            path = out / f"sweep_{rank}d_{dtype}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(str(path))
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--problems", default="",
                        help="problem sets (names in configs/problems or paths); default: on a GPU "
                             f"{GPU_DEFAULT_SETS}, elsewhere tiny")
    parser.add_argument("--names", default="", help="only these problem names (comma-separated)")
    parser.add_argument("--backends", default="auto", help="jna backends, comma-separated")
    parser.add_argument("--baseline", default="auto", choices=("auto", "none"),
                        help="auto: cuDNN dense attention on NVIDIA GPUs, XLA's elsewhere")
    parser.add_argument("--modes", default="fwd,fwd_bwd")
    parser.add_argument("--dtypes", default="bfloat16")
    parser.add_argument("--budget-s", type=float, default=2.0, help="timing budget per cell")
    parser.add_argument("--memory-fraction", type=float, default=0.9,
                        help="skip cells that need more than this share of device memory")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench"))
    parser.add_argument("--plot", action="store_true", help="write PNG plots of the sweeps")
    parser.add_argument("--check", action="store_true",
                        help="record each backend's forward distance from the reference backend (small problems)")
    args = parser.parse_args(argv)

    args.problems = args.problems or (GPU_DEFAULT_SETS if jax.default_backend() == "gpu" else "tiny")
    files = resolve_problem_files(args.problems)
    problems = [p for f in files for p in problem_sets.load(f)]
    if args.names:
        wanted = args.names.split(",")
        unknown = sorted(set(wanted) - {p.name for p in problems})
        if unknown:
            raise SystemExit(f"--names: {', '.join(unknown)} not in {args.problems}")
        problems = [p for p in problems if p.name in wanted]
    modes = [m for m in args.modes.split(",") if m]
    bad = sorted(set(modes) - set(harness.MODES))
    if bad:
        raise SystemExit(f"--modes: {', '.join(bad)} (choose from {', '.join(harness.MODES)})")
    dtypes = [jnp.dtype(d) for d in args.dtypes.split(",") if d]
    backends = [b for b in args.backends.split(",") if b]
    baseline = None if args.baseline == "none" else harness.dense_baseline_name()
    memory = harness.device_memory_bytes()
    memory_limit = int(memory * args.memory_fraction) if memory else None

    import jna
    device = jax.devices()[0]
    meta = {"device": f"{device.device_kind} ({device.platform})", "jax": jax.__version__,
            "jna": jna.__version__, "commit": commit(), "baseline": baseline,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "problem_files": [pathlib.Path(f).name for f in files], "budget_s": args.budget_s,
            "memory_limit_bytes": memory_limit}
    _progress(f"{len(problems)} problems x {len(dtypes)} dtypes x {len(backends) + bool(baseline)} "
              f"candidates x {len(modes)} modes on {meta['device']}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save_partial(rows):  # a run cut short (time limit) keeps the rows it measured
        (out / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows, "partial": True}, indent=1))
        (out / "bench.md").write_text(markdown(meta, rows, modes))

    rows = run(problems, backends, baseline, modes, dtypes, args.budget_s, memory_limit, save_partial,
               check=args.check)
    plots = plot(rows, modes, baseline, out, meta) if args.plot else []
    (out / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows, "plots": plots}, indent=1))
    md = markdown(meta, rows, modes)
    if plots:
        md += "\n" + "\n".join(f"![{pathlib.Path(p).stem}]({pathlib.Path(p).name})" for p in plots) + "\n"
    (out / "bench.md").write_text(md)
    print(md)
    errors = [(r["problem"], r["backend"], m) for r in rows for m in modes if r.get(f"{m}_error")]
    if errors:
        _progress(f"{len(errors)} cells failed: {errors}")
    return 1 if errors else 0

if __name__ == "__main__":
    sys.exit(main())
