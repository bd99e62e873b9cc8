"""Probe: the all-finite check that guards the fused kernels, in isolation and end to end.

    python -m benchmarks finite-probe [--problems 1d-long,1d-long-gna,2d-flux-gna,2d-nat]
                                      [--backend auto] [--budget-s 1] [--out DIR]

Times three ways of writing the check on each problem's (bf16) ``v``: ``all(isfinite)``, the
float ``isfinite(max|v|)`` and an integer max over the exponent bits, with the memory floor of
one read; checks each flags a NaN planted at a random position; then times the forward of each
problem with the shipped check (`jna._src.finite.all_finite`, looked up at trace time) and with
``all(isfinite)`` patched in. Prints a markdown table last. (The run of 2026-12-01 shipped the
exponent-bits variant; it measured no faster, so the plain predicate ships now.)
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from jna._src import finite
from jna.tuning import problem_sets

VARIANTS = {
    "all(isfinite(v))": lambda v: jnp.all(jnp.isfinite(v)),
    "isfinite(max|v|)": lambda v: jnp.isfinite(jnp.max(jnp.abs(v))),
    # The raw bits: finite iff the exponent field is not all ones (bf16: 0x7F80).
    "exponent bits max": lambda v: jnp.max(jax.lax.bitcast_convert_type(v, jnp.uint16) & 0x7F80) < 0x7F80,
}
HBM_TB_S = 4.8  # H200 HBM3e peak, for the memory floor


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", default="1d-long,1d-long-gna,2d-flux-gna,2d-nat")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--budget-s", type=float, default=1.0)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    names = args.problems.split(",")
    problems = [p for p in problem_sets.load("public") if p.name in names]
    rows = []
    shipped = finite.all_finite
    for p in problems:
        q, k, v, _ = p.inputs(jnp.bfloat16)
        row = {"problem": p.name, "v_mb": v.size * 2 / 1e6, "floor_ms": v.size * 2 / (HBM_TB_S * 1e12) * 1e3}
        for name, fn in VARIANTS.items():
            jitted = jax.jit(fn)
            bad = v.reshape(-1).at[np.random.default_rng(0).integers(v.size)].set(jnp.nan).reshape(v.shape)
            row[f"{name} ok"] = bool(jitted(v)) and not bool(jitted(bad))
            row[f"{name} ms"] = harness.time_ms(jitted, (v,), args.budget_s)
        fn = harness.na_function(p, args.backend)
        for label, check in (("fwd ms, shipped check", shipped), ("fwd ms, all(isfinite)", VARIANTS["all(isfinite(v))"])):
            finite.all_finite = check
            try:
                row[label] = harness.time_ms(jax.jit(fn), (q, k, v), args.budget_s)
            finally:
                finite.all_finite = shipped
        rows.append(row)
        print(json.dumps(row), flush=True)
    cols = list(rows[0])
    table = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        table.append("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    text = (f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, backend {args.backend}, bf16, "
            f"medians\n\n" + "\n".join(table) + "\n")
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "finite_probe.json").write_text(json.dumps(rows, indent=1))
        (out / "finite_probe.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
