"""Where the time of one jna call goes: every GPU kernel of the compiled call, with its time.

    python -m benchmarks profile-call [--problems public,paper_sweeps,models]
        [--names 2d-nat,2d-dinat,sweep-1d-k3,...] [--backends auto] [--modes fwd,fwd_bwd]
        [--iters 20] [--budget-s 1] [--rpb] [--out DIR]

For each (problem, backend, mode): the median wall time of the jitted call (`harness.time_ms`),
then ``--iters`` back-to-back calls under `jax.profiler.trace` (CUPTI on a GPU). From the trace
(``perfetto_trace.json.gz``): every kernel on the device's streams, grouped by name, with
launches and microseconds per call; the device-busy time per call (the union of the kernels'
intervals) and what is left of the wall time (launch gaps, host work, waits). The memory floor
(`Problem.floor_ms`) is printed beside each call. Writes ``call_profile.json``,
``call_profile.md`` and the raw traces' per-thread sums to ``--out``; prints the table last.

``--rpb``: the calls take a relative positional bias (float32, as the Flax layers pass it; the
backward's gradients then include d_rpb, as in `benchmarks.rpb_bench`).

This is timing, not a correctness check. Issue 16 asks for it on the small-window problems.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import gzip
import json
import pathlib
import re
import tempfile

import jax
import jax.numpy as jnp

from benchmarks import harness
from benchmarks import problems as problem_sets
from benchmarks.bench import commit, resolve_problem_files

DEFAULT_NAMES = ("2d-nat,2d-dinat,sweep-1d-k3,sweep-1d-k127,sweep-2d-k3,sweep-2d-k7,sweep-2d-k13,"
                 "sweep-3d-k7")


def _trace_events(log_dir: pathlib.Path) -> dict:
    paths = sorted(log_dir.rglob("perfetto_trace.json.gz"))
    if not paths:
        raise RuntimeError(f"no perfetto_trace.json.gz under {log_dir}")
    with gzip.open(paths[-1], "rt") as f:
        return json.load(f)


def summarize(trace: dict, iters: int) -> dict:
    """Kernels per call from a perfetto trace: ``{"kernels": [...], "busy_us", "threads"}``.

    Device work is what runs on a process named like ``/device:GPU:0`` on a thread named like
    ``Stream #...`` (CUPTI's kernels and copies); other threads of that process (XLA's derived
    "XLA Ops"/"XLA Modules" lines) are only summed in ``threads``, so nothing is counted twice.
    """
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    process, thread = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            process[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            thread[(e["pid"], e["tid"])] = e["args"]["name"]
    device_pids = {pid for pid, name in process.items() if re.search(r"/device:(GPU|gpu)", name)}
    if not device_pids:  # another naming of the device plane: any process with a "Stream" thread
        device_pids = {pid for (pid, _), name in thread.items() if name.lower().startswith("stream")}
    threads = collections.defaultdict(lambda: [0, 0.0])
    kernels = collections.defaultdict(lambda: [0, 0.0])
    intervals = []
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        tname = thread.get((e["pid"], e["tid"]), str(e["tid"]))
        key = f"{process.get(e['pid'], e['pid'])} / {tname}"
        threads[key][0] += 1
        threads[key][1] += float(e["dur"])
        if e["pid"] in device_pids and tname.lower().startswith("stream"):
            kernels[e["name"]][0] += 1
            kernels[e["name"]][1] += float(e["dur"])
            intervals.append((float(e["ts"]), float(e["ts"]) + float(e["dur"])))
    busy, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):  # the union of the device intervals
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    rows = [{"kernel": name, "launches": n / iters, "us": us / iters}
            for name, (n, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1])]
    return {"kernels": rows, "busy_us": busy / iters,
            "threads": {k: {"events": n, "us": round(us, 1)} for k, (n, us) in sorted(threads.items())}}


def _rpb_call(problem, backend: str, mode: str):
    """The jitted call and its arguments with a relative positional bias (`rpb_bench`'s calls)."""
    from benchmarks import rpb_bench

    q, k, v, dout = problem.inputs(jnp.bfloat16)
    shape = (problem.heads, *(2 * kk - 1 for kk in problem.kernel_size))
    table = 0.5 * jax.random.normal(jax.random.key(7), shape, jnp.float32)
    fwd, grads = rpb_bench._calls(rpb_bench._na(problem, backend, True), True)
    return (fwd, (q, k, v, table)) if mode == "fwd" else (grads, (q, k, v, table, dout))


def profile_call(problem, backend: str, mode: str, iters: int, budget_s: float, rpb: bool = False) -> dict:
    if rpb:
        jitted, call_args = _rpb_call(problem, backend, mode)
    else:
        args = problem.inputs(jnp.bfloat16)
        jitted, call_args = harness.compiled(harness.candidate(problem, backend), mode, args)
    jax.block_until_ready(jitted(*call_args))
    wall_ms = harness.time_ms(jitted, call_args, budget_s)
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            out = None
            for _ in range(iters):
                out = jitted(*call_args)
            jax.block_until_ready(out)
        summary = summarize(_trace_events(pathlib.Path(tmp)), iters)
    floor = problem.floor_ms(mode)
    return {"problem": problem.name, "backend": backend + ("+rpb" if rpb else ""), "mode": mode, "wall_ms": wall_ms,
            "floor_ms": floor, "busy_ms": summary["busy_us"] / 1e3,
            "launches": sum(k["launches"] for k in summary["kernels"]), **summary}


def _short(name: str, width: int = 60) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def markdown(meta: dict, rows: list[dict], top: int = 8) -> str:
    lines = [f"# Where a jna call's time goes ({meta['device']}, jax {meta['jax']}, commit {meta['commit']}, "
             f"{meta['date']})", "",
             f"bf16; wall = median of the jitted call; device busy = the union of its kernels' intervals "
             f"per call ({meta['iters']} back-to-back calls under `jax.profiler.trace`); floor = the memory "
             "floor (`Problem.floor_ms`). Per call, the kernels by time (us per call, launches per call).", "",
             "| problem | backend | mode | wall ms | device busy ms | not busy ms | floor ms | launches | kernels (us) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['problem']} | {r['backend']} | {r['mode']} | error: {r['error'][:120]} | | | | | |")
            continue
        ks = "; ".join(f"{_short(k['kernel'])} {k['us']:.1f}" + (f" (x{k['launches']:.0f})" if k["launches"] > 1.01 else "")
                       for k in r["kernels"][:top])
        floor = "-" if r["floor_ms"] is None else f"{r['floor_ms']:.4f}"
        lines.append(f"| {r['problem']} | {r['backend']} | {r['mode']} | {r['wall_ms']:.4f} | {r['busy_ms']:.4f} | "
                     f"{r['wall_ms'] - r['busy_ms']:.4f} | {floor} | {r['launches']:.0f} | {ks} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", default="public,paper_sweeps,models")
    ap.add_argument("--names", default=DEFAULT_NAMES)
    ap.add_argument("--backends", default="auto")
    ap.add_argument("--modes", default="fwd,fwd_bwd")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=1.0)
    ap.add_argument("--rpb", action="store_true", help="the calls take a relative positional bias")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    problems = [p for f in resolve_problem_files(args.problems) for p in problem_sets.load(f)]
    wanted = [n for n in args.names.split(",") if n]
    by_name = {p.name: p for p in problems}
    missing = [n for n in wanted if n not in by_name]
    if missing:
        raise SystemExit(f"--names: {', '.join(missing)} not in {args.problems}")
    device = jax.devices()[0]
    meta = {"device": device.device_kind, "jax": jax.__version__, "commit": commit(), "iters": args.iters,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    rows = []
    out = pathlib.Path(args.out) if args.out else None
    for name in wanted:
        for backend in (b for b in args.backends.split(",") if b):
            for mode in (m for m in args.modes.split(",") if m):
                try:
                    row = profile_call(by_name[name], backend, mode, args.iters, args.budget_s, args.rpb)
                except Exception as e:  # noqa: BLE001 - one failing cell is reported, the rest run
                    row = {"problem": name, "backend": backend, "mode": mode, "error": f"{type(e).__name__}: {e}"}
                rows.append(row)
                shown = row.get("error") or f"wall {row['wall_ms']:.4f} ms, busy {row['busy_ms']:.4f} ms, " \
                                            f"{row['launches']:.0f} launches"
                print(f"{name} {backend} {mode}: {shown}", flush=True)
                if out:
                    out.mkdir(parents=True, exist_ok=True)
                    (out / "call_profile.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    text = markdown(meta, rows)
    if out:
        (out / "call_profile.md").write_text(text)
    print(text)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
