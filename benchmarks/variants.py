"""Fused-kernel config variants side by side on this GPU: time, agreement, determinism.

    python -m benchmarks variants [--field backward --values split,fused --mode fwd_bwd]
        [--problems 2d-flux,3d-hunyuan] [--out DIR] [--budget-s 4]
    python -m benchmarks variants --field persistent --values false,true --mode fwd
    python -m benchmarks variants --backend fused-triton --field direct_layout --values false,true \
        --sets public,models --problems 2d-dinat,dinat-tiny-s2 --mode fwd

Per public problem (bf16, the backend's default config for it, with one config field
set to each value; ``--backend`` fused-mosaic, the default, or fused-triton): the forward (``--mode fwd``) or forward+backward (``fwd_bwd``: the jitted VJP
of ``sum(out * dout)``, `jna.tuning.timing.fwd_bwd`) time and effective TFLOP/s (3.5 x the
forward FLOPs for fwd_bwd), the relative L2 of each variant's outputs (out, or dq/dk/dv) against
the first variant's, and whether 5 runs of each give bitwise-equal results. Hopper only.

``backward``: ``"split"`` (a dQ kernel and a dK/dV kernel, 7 matmuls per tile pair) vs
``"fused"`` (one kernel, 5 matmuls, dQ added in a fixed order). ``persistent``: one CTA per Q
tile vs one CTA per SM looping over Q tiles (forward). fused-triton's ``direct_layout``: False
permutes tokens (XLA copies) always; True reads tiles in place where the layout allows (the
direct layout, or the grouped one for dilation and ragged tiles).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jna
from benchmarks import harness
from jna.backends import FusedMosaic, FusedTriton
from jna.tuning import problem_sets

OUTPUT_NAMES = {"fwd": ("out",), "fwd_bwd": ("dq", "dk", "dv")}


def _rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _parse(value: str):
    return {"true": True, "false": False}.get(value.lower(), int(value) if value.isdigit() else value)


BACKENDS = {"fused-mosaic": FusedMosaic, "fused-triton": FusedTriton}


def measure(problem, field: str, values, mode: str, budget_s: float, repeats: int = 5,
            backend: str = "fused-mosaic") -> dict:
    """One problem: per value ms, TFLOP/s, repeatability; agreement with the first value."""
    cls = BACKENDS[backend]
    base = cls().config_for(problem.na_problem(jnp.bfloat16))
    q, k, v, dout = problem.inputs(jnp.bfloat16)
    row = {"problem": problem.name, "config": str(base), "field": field, "mode": mode}
    results = {}
    for value in values:
        key = str(value)
        config = dataclasses.replace(base, **{field: value})
        fn = functools.partial(jna.neighborhood_attention, backend=cls(config),
                               **problem.na_kwargs)
        jitted, args = harness.compiled(fn, mode, (q, k, v, dout))
        as_list = (lambda r: [np.asarray(r)]) if mode == "fwd" else (lambda r: [np.asarray(x) for x in r])
        try:
            first = as_list(jitted(*args))
            same = all(all(np.array_equal(a, b) for a, b in zip(first, as_list(jitted(*args))))
                       for _ in range(repeats - 1))
            ms = harness.time_ms(jitted, args, budget_s)
        except Exception as e:  # noqa: BLE001 - report and go on
            row[key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            continue
        results[key] = first
        row[key] = {"ms": round(ms, 4), "tflops": round(harness.tflops(problem, mode, ms), 1),
                    "bitwise_repeatable": bool(same)}
    keys = [str(v) for v in values]
    if keys[0] in results:
        for key in keys[1:]:
            if key in results:
                row[key]["rel_l2_vs_" + keys[0]] = {
                    name: _rel_l2(a, b) for name, a, b in zip(OUTPUT_NAMES[mode], results[key], results[keys[0]])}
                row[key]["speedup_vs_" + keys[0]] = round(row[keys[0]]["ms"] / row[key]["ms"], 3)
    return row


def markdown(rows, values, header: str) -> str:
    keys = [str(v) for v in values]
    lines = [header, "", "| problem | " + " | ".join(f"{k} ms (TF/s)" for k in keys)
             + " | " + " | ".join(f"{k} speedup / max rel L2 vs {keys[0]}" for k in keys[1:])
             + " | repeatable |", "|---" * (2 + 2 * len(keys) - 1) + "|"]
    for r in rows:
        cells = [f"{r[k]['ms']:.3f} ({r[k]['tflops']:.0f})" if "ms" in r.get(k, {})
                 else r.get(k, {}).get("error", "-")[:80] for k in keys]
        for k in keys[1:]:
            got = r.get(k, {})
            rel = got.get("rel_l2_vs_" + keys[0])
            cells.append(f"{got['speedup_vs_' + keys[0]]} / {max(rel.values()):.1e}" if rel else "-")
        cells.append(" / ".join(str(r.get(k, {}).get("bitwise_repeatable", "-")) for k in keys))
        lines.append(f"| {r['problem']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None, defaults=None) -> int:
    defaults = defaults or {}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=defaults.get("backend", "fused-mosaic"), choices=sorted(BACKENDS))
    parser.add_argument("--field", default=defaults.get("field", "backward"), help="a config field of the backend")
    parser.add_argument("--values", default=defaults.get("values", "split,fused"))
    parser.add_argument("--mode", default=defaults.get("mode", "fwd_bwd"), choices=("fwd", "fwd_bwd"))
    parser.add_argument("--problems", default="", help="comma-separated problem names (of --sets)")
    parser.add_argument("--sets", default="public", help="problem sets (configs/problems names)")
    parser.add_argument("--budget-s", type=float, default=4.0)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    cls = BACKENDS[args.backend]
    if not cls().runs_natively():
        print(f"{args.backend} needs a GPU it runs on natively")
        return 2
    values = [_parse(v) for v in args.values.split(",")]
    names = [n for n in args.problems.split(",") if n]
    problems = [p for name in args.sets.split(",") for p in problem_sets.load(name) if (not names or p.name in names)
                and cls().supports(p.na_problem(jnp.bfloat16)) is None]
    rows = []
    for p in problems:
        rows.append(measure(p, args.field, values, args.mode, args.budget_s, backend=args.backend))
        print(json.dumps(rows[-1]), flush=True)
    header = (f"{args.backend} `{args.field}` in {values}, {args.mode}, {jax.devices()[0].device_kind}, "
              f"jax {jax.__version__}, bf16")
    text = markdown(rows, values, header)
    print(text)
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"variants_{args.field}" if args.backend == "fused-mosaic" else f"variants_{args.backend}_{args.field}_{args.mode}"
        (out / f"{stem}.json").write_text(json.dumps(rows, indent=1) + "\n")
        (out / f"{stem}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
