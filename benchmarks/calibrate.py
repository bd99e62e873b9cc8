"""Calibrates the launch classes of a fused backend on this GPU (the speeds of configs/*.json).

    python -m benchmarks calibrate --backend fused-triton [--problems blocked] [--write PATH]
    python -m benchmarks calibrate --backend fused-mosaic --problems public --write PATH

One method for every fused backend, through the backend contract (`jna.backends.base.Backend`):
per launch class (`jna.backends.launch`) and calibration problem, the class's most tile-efficient
config at that problem (`Backend.candidate_configs`, the plain variant of the class) runs through
the public API as ``backend=<Backend>(config)``; its speed is the TFLOP/s it reaches divided by
the tile efficiency, and the class's ``speed`` / ``fwd_bwd_speed`` are the medians over the
problems. The chooser multiplies them by a problem's tile efficiency.

Calibration problems (``--problems``):
  blocked: one 1-D problem, window = stride = 1024 tokens (every tile size divides the windows:
    tile efficiency 1), 2 x 16384 tokens, 16 heads, head dim = the class's ``max_head_dim`` (128
    without one), bf16. How the shipped fused-triton classes were calibrated.
  public: the public problems (``configs/problems/public.json``) whose head dim falls in the
    class's bucket. How the shipped fused-mosaic classes were calibrated (then kernel-only times;
    end-to-end here, so the permutations count: recalibrated speeds are comparable to each other,
    not to the shipped ones).

The per-problem kernel-only sweep of fused-mosaic is ``python -m benchmarks profile``; the
per-problem tuner is ``python -m jna.tuning``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

import jax
import jax.numpy as jnp

from benchmarks import harness
from jna import backends
from jna._src import resources
from jna.backends import launch
from jna.tuning import problem_sets

FUSED = ("fused-triton", "fused-mosaic")


def blocked_problem(head_dim: int) -> problem_sets.Problem:
    return problem_sets.Problem(f"blocked-1d-d{head_dim}", 2, 16, head_dim, (16384,), (1024,),
                                (1024,), (1,), (False,))


def calibration_problems(which: str, c: launch.LaunchClass, classes) -> list[problem_sets.Problem]:
    """``blocked`` or the public problems a class is chosen for (its head-dim bucket; D >= 64 for
    classes without a bucket: below, ``auto`` prefers fused-triton)."""
    if which == "blocked":
        return [blocked_problem(c.max_head_dim or 128)]
    return [p for p in problem_sets.load("public")
            if c in launch.for_head_dim(classes, p.head_dim) and (c.max_head_dim or p.head_dim >= 64)]


def class_config(backend: backends.Backend, c: launch.LaunchClass, problem):
    """The class's most tile-efficient plain config at ``problem``: ``(config, efficiency)``."""
    plain = [(cfg, eff) for fields, cfg, eff in backend.candidate_configs(problem.na_problem(), 1)
             if fields == c.fields]
    return plain[0] if plain else (None, 0.0)


def calibrate(name: str, which: str, budget_s: float) -> tuple[list[launch.LaunchClass], list[dict]]:
    """Every class of backend ``name`` measured: ``(classes with new speeds, rows)``."""
    backend = backends.get(name)
    out, rows = [], []
    classes = backend.launch_classes()
    for c in classes:
        speeds = []
        for problem in calibration_problems(which, c, classes):
            config, eff = class_config(backend, c, problem)
            row = dict(backend=name, problem=problem.name, **c.fields)
            if config is None:
                rows.append(dict(row, skipped="no tile shape of this class fits"))
                continue
            args = problem.inputs(jnp.bfloat16)
            fn = harness.na_function(problem, type(backend)(config))
            times = {}
            try:
                for mode in harness.MODES:
                    jitted, call_args = harness.compiled(fn, mode, args)
                    times[mode] = harness.time_ms(jitted, call_args, budget_s)
            except Exception as e:  # noqa: BLE001 - a class that fails to compile gets speed 0
                rows.append(dict(row, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
                print(f"{name} {c.fields} {problem.name}: {rows[-1]['error']}", flush=True)
                continue
            speed = {m: harness.tflops(problem, m, t) / eff for m, t in times.items()}
            speeds.append((speed["fwd"], speed["fwd_bwd"]))
            rows.append(dict(row, efficiency=round(eff, 3), **{f"{m}_ms": round(t, 4) for m, t in times.items()},
                             speed=round(speed["fwd"], 1), fwd_bwd_speed=round(speed["fwd_bwd"], 1)))
            print(f"{name:12s} {json.dumps(c.fields):90s} {problem.name:16s} eff {eff:4.2f} "
                  f"fwd {times['fwd']:8.3f} ms {speed['fwd']:6.1f} TF/s  fwd+bwd {times['fwd_bwd']:8.3f} ms "
                  f"{speed['fwd_bwd']:6.1f} TF/s", flush=True)
        fwd = round(statistics.median(s for s, _ in speeds), 1) if speeds else 0.0
        fwd_bwd = round(statistics.median(s for _, s in speeds), 1) if speeds else 0.0
        out.append(c.with_speeds(fwd, fwd_bwd))
    return out, rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", required=True, choices=FUSED)
    parser.add_argument("--problems", default="blocked", choices=("blocked", "public"))
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timing per cell")
    parser.add_argument("--write", default="", help="write the calibrated config JSON here")
    parser.add_argument("--out", default="", help="write the measured rows (JSON) here")
    args = parser.parse_args(argv)
    backend = backends.get(args.backend)
    if not backend.runs_natively():
        print(f"{args.backend} does not run natively here ({jax.default_backend()}): calibrate on its GPU.")
        return 2
    classes, rows = calibrate(args.backend, args.problems, args.budget)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    if args.write:
        raw = resources.read_json(backend.launch_config_file)
        raw["calibrated_on"] = f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {args.problems} problems"
        raw["classes"] = [c.to_json() for c in classes]
        pathlib.Path(args.write).write_text(launch.dump_config(raw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
