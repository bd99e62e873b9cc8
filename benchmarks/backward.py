"""fused-mosaic's backward variants side by side on this GPU: time, agreement, determinism.

    python -m benchmarks backward [--problems 2d-flux,3d-hunyuan] [--out DIR] [--budget-s 4]

Per public problem (bf16, fused-mosaic's default tiles): forward+backward (the jitted VJP of
``sum(out * dout)``, `jna.tuning.timing.fwd_bwd`) with ``MosaicConfig.backward`` = ``"split"``
(a dQ kernel and a dK/dV kernel, 7 matmuls per tile pair) and ``"fused"`` (one kernel, 5
matmuls, dQ added in a fixed order), their effective TFLOP/s (3.5 x the forward FLOPs), the
relative L2 between the two variants' dq/dk/dv, and whether 5 runs of each give bitwise-equal
gradients. Hopper only.
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
from jna.backends import FusedMosaic
from jna.tuning import problem_sets

VARIANTS = ("split", "fused")


def _rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def measure(problem, budget_s: float, repeats: int = 5) -> dict:
    """One problem: per variant ms, TFLOP/s, determinism; the variants' gradient agreement."""
    backend = FusedMosaic()
    base = backend.config_for(problem.na_problem(jnp.bfloat16))
    q, k, v, dout = problem.inputs(jnp.bfloat16)
    row = {"problem": problem.name, "config": str(base)}
    grads = {}
    for variant in VARIANTS:
        config = dataclasses.replace(base, backward=variant)
        fn = functools.partial(jna.neighborhood_attention, backend=FusedMosaic(config),
                               **problem.na_kwargs)
        jitted, args = harness.compiled(fn, "fwd_bwd", (q, k, v, dout))
        try:
            first = [np.asarray(g) for g in jitted(*args)]
            same = all(all(np.array_equal(a, np.asarray(b)) for a, b in zip(first, jitted(*args)))
                       for _ in range(repeats - 1))
            ms = harness.time_ms(jitted, args, budget_s)
        except Exception as e:  # noqa: BLE001 - report and go on
            row[variant] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            continue
        grads[variant] = first
        row[variant] = {"ms": round(ms, 4), "tflops": round(harness.tflops(problem, "fwd_bwd", ms), 1),
                        "bitwise_repeatable": bool(same)}
    if len(grads) == 2:
        row["rel_l2_fused_vs_split"] = {name: _rel_l2(a, b) for name, a, b in
                                        zip(("dq", "dk", "dv"), grads["fused"], grads["split"])}
    if all("ms" in row.get(v, {}) for v in VARIANTS):
        row["speedup"] = round(row["split"]["ms"] / row["fused"]["ms"], 3)
    return row


def markdown(rows, header: str) -> str:
    lines = [header, "", "| problem | split ms (TF/s) | fused ms (TF/s) | speedup | split / fused repeatable "
             "| max rel L2 fused vs split |", "|---|---|---|---|---|---|"]

    def cell(r, v):
        got = r.get(v, {})
        return f"{got['ms']:.3f} ({got['tflops']:.0f})" if "ms" in got else got.get("error", "-")[:80]

    for r in rows:
        rel = r.get("rel_l2_fused_vs_split")
        repeatable = " / ".join(str(r.get(v, {}).get("bitwise_repeatable", "-")) for v in VARIANTS)
        lines.append(f"| {r['problem']} | {cell(r, 'split')} | {cell(r, 'fused')} | {r.get('speedup', '-')} "
                     f"| {repeatable} | {max(rel.values()) if rel else float('nan'):.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", default="", help="comma-separated public problem names")
    parser.add_argument("--budget-s", type=float, default=4.0)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    if not FusedMosaic().runs_natively():
        print("fused-mosaic needs a Hopper GPU")
        return 2
    names = [n for n in args.problems.split(",") if n]
    problems = [p for p in problem_sets.load("public") if (not names or p.name in names)
                and FusedMosaic().supports(p.na_problem(jnp.bfloat16)) is None]
    rows = []
    for p in problems:
        rows.append(measure(p, args.budget_s))
        print(json.dumps(rows[-1]), flush=True)
    header = (f"fused-mosaic backward variants, {jax.devices()[0].device_kind}, jax {jax.__version__}, "
              "bf16, forward+backward (3.5x forward FLOPs)")
    text = markdown(rows, header)
    print(text)
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "backward_variants.json").write_text(json.dumps(rows, indent=1) + "\n")
        (out / "backward_variants.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
