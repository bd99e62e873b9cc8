"""Where fused-mosaic's time goes, per public problem (Hopper; timing only, not a correctness check).

    python -m benchmarks profile [--problems 2d-flux,2d-flux-gna]

Columns (ms, median of synchronized batches, `jna.tuning.timing.budgeted_median_ms`): ``total`` the forward as users call it
(`jna.neighborhood_attention`, backend fused-mosaic: isfinite check, permutations, kernel);
``kernel`` the forward kernel alone on permuted tensors; ``no-mask`` the same kernel with every
tile pair treated as full (wrong results: the cost of the edge masks is the difference);
``perm`` the permutations of q/k/v plus the inverse of out/lse; ``finite`` the all-finite check
of v; ``dq``/``dkv`` the two backward kernels alone.

``one-step``: the kernel with every Q tile visiting only its first KV tile (wrong results): the
fixed cost of a CTA (launch, Q load, first K/V wait, epilogue, output store) plus one step.
From it: ``steps`` (mean KV tiles a Q tile visits), ``us per step (all CTAs)`` (``(kernel - one-step) /
(steps - 1)`` per wave of CTAs, i.e. the steady state) and ``fixed %`` (the share of the kernel
that a persistent kernel overlapping one tile's epilogue with the next one's loads could hide,
bounded by ``one-step`` minus one step). ``loop TF/s``: the computed-pair FLOPs of the kernel over
its steady-state time (``kernel - fixed``): the main loop's speed against the wgmma peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import pathlib


import jax
import jax.numpy as jnp
import numpy as np

import jna
from benchmarks.mosaic_check import _problem_of, _random, public_problems
from jna._src import plan as planning
from jna.backends.mosaic import op as fused_mosaic
from jna.backends.mosaic import backward as mosaic_backward
from jna.backends.mosaic import forward as mosaic_forward
from jna.tuning.timing import budgeted_median_ms


def all_full(plan: planning.TilePlan) -> planning.TilePlan:
    """``plan`` with every tile pair flagged full (no edge masks; wrong results, same kernel code).

    Only the table values change: patching the in-kernel flag to a constant instead makes Mosaic
    GPU's layout inference fail (jax 0.11.2)."""
    tables = np.array(plan.tables)
    for a, ax in enumerate(plan.axes):
        start = plan.offsets[a][4]
        tables[start:start + ax.pair_full.size] = 1
    return dataclasses.replace(plan, tables=tables)


def one_step(plan: planning.TilePlan) -> planning.TilePlan:
    """``plan`` with every Q tile visiting only its first KV tile (wrong results, same code)."""
    tables = np.array(plan.tables)
    for a, ax in enumerate(plan.axes):
        start = plan.offsets[a][1]
        tables[start:start + ax.kv_count.size] = np.minimum(ax.kv_count.ravel(), 1)
    return dataclasses.replace(plan, tables=tables)


def mean_steps(plan: planning.TilePlan) -> float:
    """Mean number of KV tiles a Q tile visits (the product of the per-axis counts)."""
    counts = [ax.kv_count.astype(np.float64) for ax in plan.axes]  # [dilation_a, nq_a]
    total = 1.0
    for c in counts:
        total *= c.mean()
    return total


def _timed(budget_s: float, fn, *args) -> float:
    """Median ms of ``fn(*args)``, calls under 20 ms batched (`jna.tuning.timing.budgeted_median_ms`):
    a millisecond kernel timed one synchronized call at a time would be mostly dispatch."""
    return budgeted_median_ms(fn, args, budget_s)


def profile(p, budget_s: float):
    b, h, d, shape = p["batch"], p["heads"], p["head_dim"], tuple(p["shape"])
    q, k, v, do = (_random((b, *shape, h, d), jnp.bfloat16, s) for s in (1, 2, 3, 4))
    args = (p["kernel_size"], p["stride"], p["dilation"], p["is_causal"])
    problem = _problem_of(q, k, v, *args)
    st = fused_mosaic._static(problem, fused_mosaic.default_config(problem), None)
    row = {"problem": p["name"], "eff": round(st.plan.efficiency, 3)}
    na = functools.partial(jna.neighborhood_attention, kernel_size=args[0], stride=args[1],
                           dilation=args[2], is_causal=args[3], backend="fused-mosaic")
    row["total"] = _timed(budget_s, jax.jit(na), q, k, v)

    def permute_all(q, k, v):
        qp = planning.permute(q, st.plan, "q")
        kp, vp = (planning.permute(x, st.plan, "kv") for x in (k, v))
        out = planning.unpermute(qp, st.plan, "q", problem.spatial_shape)
        lse = planning.unpermute(qp[..., 0].astype(jnp.float32), st.plan, "q", problem.spatial_shape)
        return out, lse, kp, vp

    row["perm"] = _timed(budget_s, jax.jit(permute_all), q, k, v)
    row["finite"] = _timed(budget_s, jax.jit(lambda v: jnp.all(jnp.isfinite(v))), v)
    qp, dop = (planning.permute(x, st.plan, "q") for x in (q, do))
    kp, vp = (planning.permute(x, st.plan, "kv") for x in (k, v))
    fwd = jax.jit(functools.partial(mosaic_forward.forward_call, st=st))
    row["kernel"] = _timed(budget_s, fwd, qp, kp, vp)
    out, lse = fwd(qp, kp, vp)
    delta = jnp.einsum("bnhd,bnhd->bhn", out.astype(jnp.float32), dop.astype(jnp.float32))
    row["dq"] = _timed(budget_s, jax.jit(functools.partial(mosaic_backward.dq_call, st=st)),
                          qp, kp, vp, dop, lse, delta)
    row["dkv"] = _timed(budget_s, jax.jit(functools.partial(mosaic_backward.dkv_call, st=st)),
                           qp, kp, vp, dop, lse, delta)
    no_mask = dataclasses.replace(st, plan=all_full(st.plan))
    row["no-mask"] = _timed(budget_s, jax.jit(functools.partial(mosaic_forward.forward_call, st=no_mask)),
                               qp, kp, vp)
    single = dataclasses.replace(st, plan=one_step(st.plan))
    row["one-step"] = _timed(budget_s, jax.jit(functools.partial(mosaic_forward.forward_call, st=single)),
                                qp, kp, vp)
    steps = mean_steps(st.plan)
    row["steps"] = round(steps, 1)
    per_step = (row["kernel"] - row["one-step"]) / max(steps - 1.0, 1e-9)
    fixed = max(row["one-step"] - per_step, 0.0)
    row["us per step (all CTAs)"] = round(per_step * 1e3, 2)
    row["fixed %"] = round(100.0 * fixed / row["kernel"], 1)
    row["mask %"] = round(100.0 * (row["kernel"] - row["no-mask"]) / row["kernel"], 1)
    row["perm %"] = round(100.0 * row["perm"] / row["total"], 1)
    flops = 4.0 * b * h * math.prod(shape) * math.prod(p["kernel_size"]) * d
    row["kernel TF/s on computed pairs"] = round(flops / st.plan.efficiency / row["kernel"] / 1e9, 1)
    row["loop TF/s"] = round(flops / st.plan.efficiency / (row["kernel"] - fixed) / 1e9, 1)
    return row


def _table(rows) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--problems", default="")
    parser.add_argument("--budget-s", type=float, default=1.0, help="timing budget per measurement")
    parser.add_argument("--out", default="", help="also write profile.json and profile.md here")
    args = parser.parse_args()
    rows = []
    for p in public_problems([n for n in args.problems.split(",") if n]):
        rows.append(profile(p, args.budget_s))
        print(rows[-1], flush=True)  # each row as it is done: a timeout keeps the finished ones
        table = _table(rows)
        if args.out:  # rewritten after every row, for the same reason
            out = pathlib.Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                    "commit": os.environ.get("JNA_COMMIT", ""), "budget_s": args.budget_s}
            (out / "profile.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
            (out / "profile.md").write_text(
                f"# fused-mosaic forward profile ({meta['device']}, jax {meta['jax']}, "
                f"commit {meta['commit']})\n\n" + table + "\n")
    print(_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
