"""fused-triton's default configs timed under variants of its per-tile work (issue 16).

    python -m benchmarks mask-work --variant default --names 2d-nat,sweep-1d-k3 [--rpb] [--out F]
    python -m benchmarks mask-work --variant nomask ...        # no window mask at all (wrong results)
    python -m benchmarks mask-work --variant thr:0,1,1 ...     # MASK_EVERY_STEP_BELOW forward,dq,dkv

Per problem (bf16, the public, models and paper-sweep sets; ``--rpb``: with a random relative
positional bias): the forward and forward+backward medians of ``fused_triton.attention`` at the
problem's default config, one JSON line each (appended to ``--out``). ``nomask`` replaces the
window mask by all-true (an upper bound on what the mask costs; the results are wrong);
``thr:F,Q,K`` sets the fraction of full tile pairs under which the forward, dQ and dK/dV walks
mask every step (`fused.MASK_EVERY_STEP_BELOW`: 0 always branches on the per-step flag, above 1
never does). A before/after comparison runs ``--variant default`` with an older checkout's ``jna``
first on ``PYTHONPATH`` (``scripts/gpu_mask_work.sh``).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from jna.backends import tiling
from jna.backends.triton import fused as ft
from jna.tuning import problem_sets
from jna.tuning.timing import fwd_bwd, median_ms

SETS = ("public", "models", "paper_sweeps")


def apply(variant: str) -> None:
    """Patches this process's fused-triton for ``variant`` (see the module docstring)."""
    if variant == "nomask":
        tiling.Geometry.mask = lambda self, spans, y: jnp.full((spans[0][0].shape[0], y[0].shape[0]), True)
    elif variant.startswith("thr:"):
        forward, dq, dkv = map(float, variant[4:].split(","))
        ft.MASK_EVERY_STEP_BELOW.update(forward=forward, dq=dq, dkv=dkv)
    elif variant != "default":
        raise SystemExit(f"--variant: unknown {variant!r}")


def measure(problem, variant: str, rpb: bool) -> dict:
    na = problem.na_problem(jnp.bfloat16)
    q, k, v, dout = problem.inputs(jnp.bfloat16)
    cfg = ft.default_config(na)
    bias = None
    if rpb:
        shape = (na.heads, *(2 * n - 1 for n in na.params.kernel_size))
        bias = 0.1 * jax.random.normal(jax.random.PRNGKey(1), shape, jnp.float32)
    f = lambda q, k, v: ft.attention(q, k, v, na, cfg, rpb=bias)[0]
    # batched samples for the small calls (one synchronized call of ~0.1 ms is host-bound)
    kw = dict(warmup=3, repeats=10, inner=1) if problem.forward_flops > 5e11 else dict(warmup=3, repeats=15, inner=20)
    start = time.time()
    return dict(variant=variant, problem=problem.name, rpb=rpb, config=str(cfg),
                fwd_ms=round(median_ms(jax.jit(f), q, k, v, **kw), 4),
                fwd_bwd_ms=round(median_ms(fwd_bwd(f), q, k, v, dout, **kw), 4),
                floor_ms=(problem.floor_ms("fwd"), problem.floor_ms("fwd_bwd")),
                seconds=round(time.time() - start, 1), jax=jax.__version__,
                device=jax.devices()[0].device_kind)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="default")
    parser.add_argument("--label", default=None, help="the rows' variant name (default: --variant)")
    parser.add_argument("--names", required=True)
    parser.add_argument("--rpb", action="store_true")
    parser.add_argument("--out", default=None, help="a JSON-lines file to append to")
    args = parser.parse_args(argv)
    problems = {p.name: p for s in SETS for p in problem_sets.load(s)}
    missing = [n for n in args.names.split(",") if n not in problems]
    if missing:
        raise SystemExit(f"--names: unknown problems {missing}")
    apply(args.variant)
    for name in args.names.split(","):
        row = measure(problems[name], args.variant, args.rpb)
        row["variant"] = args.label or args.variant
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
