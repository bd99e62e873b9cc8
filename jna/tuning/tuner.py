"""Autotuner: measure a backend's tile configs on this GPU and store the best (`jna.tuning.tables`).

    python -m jna.tuning --backend fused-mosaic --problems public --names 2d-flux,3d-hunyuan
    python -m jna.tuning --backend fused-triton --shape 128,128 --kernel-size 13 --heads 8 --head-dim 64
        [--dtype bfloat16] [--objective fwd|fwd_bwd] [--shapes-per-class 2] [--max-candidates N]
        [--budget-s 1] [--table PATH] [--dry-run]

Backends: fused-triton, fused-mosaic, unfused. For each problem, the candidates are every launch
class of the backend (``configs/fused_*.json``; for fused-triton the classes of the problem's
head-dim bucket; for unfused `jna.backends.triton.unfused.TUNE_CLASSES`), each with its
``--shapes-per-class`` most tile-efficient per-axis tile shapes (fused-mosaic: each also ``persistent``, and with
``direct_layout`` where the tiles divide the map). Each candidate's forward output is first compared with the default config's
(rejected beyond ``MAX_REL_L2``); then it runs the backend's real call (token permutation
included) on random inputs and is timed (median of synchronized runs after warm-up;
``--objective fwd_bwd``: the q/k/v gradients of ``sum(out * dout)``). Candidates that fail to
compile or run are reported and skipped. Progress goes to stderr.

The best candidate, its time, the default (untuned) choice's time and every class's measured speed
(TFLOP/s at full tile efficiency) are written to the user's table, ``<user cache>/tuned/<device>.json``
(``$JNA_TUNED_DIR``, else ``$JNA_CACHE_DIR/tuned``, default ``~/.cache/jna/tuned``; ``--table``
elsewhere, e.g. ``configs/tuned/<device>.json`` in a checkout to ship it), which `jna.tuning.tables` reads
over the shipped tables for ``backend="auto"`` and explicit backend calls alike. The table is keyed
by (backend, rank, head dim, dtype): see `jna.tuning.tables` for how calls use it.

Timings on an emulated device (Pallas interpret mode on a CPU) say nothing about a GPU: the tuner
refuses to write them unless ``--allow-emulated`` (for tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import pathlib
import sys
import time

import jax
import jax.numpy as jnp

from jna import backends
from jna.backends import tiling as jna_tiling
from jna.tuning import problem_sets
from jna.tuning import tables as jna_tuned
from jna.tuning.timing import budgeted_median_ms, fwd_bwd

BACKENDS = ("fused-triton", "fused-mosaic", "unfused")

# Candidates whose forward output is farther than this (relative L2) from the default config's are
# rejected, not timed. Two correct half-precision configs differ by rounding (~1e-3).
MAX_REL_L2 = 2e-2


def _progress(*args):
    print(*args, file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class Candidate:
    class_fields: dict
    config: object  # TritonConfig or MosaicConfig
    efficiency: float

    def describe(self) -> str:
        cfg = self.config
        text = f"q{'x'.join(map(str, cfg.q_tile))} kv{'x'.join(map(str, cfg.kv_tile))}"
        extra = {k: v for k, v in self.class_fields.items() if k not in ("q_tokens", "kv_tokens", "max_head_dim")}
        return f"{text} {' '.join(f'{k}={v}' for k, v in extra.items())} (eff {self.efficiency:.2f})"


def candidates(backend: str, problem, shapes_per_class: int) -> list[Candidate]:
    """The backend's candidate configs for ``problem`` (`Backend.candidate_configs`)."""
    na = problem.na_problem()
    return [Candidate(fields, config, eff)
            for fields, config, eff in backends.get(backend).candidate_configs(na, shapes_per_class)]


def timed_call(backend: str, problem, config, objective: str, dtype):
    """``(jitted, args)``: the backend's call with ``config`` (or its default if None)."""
    op = backends.get(backend).with_config(config)
    na = problem.na_problem(dtype)

    def fwd(q, k, v):
        return op.attention(q, k, v, na)[0]

    q, k, v, dout = problem.inputs(dtype)
    if objective == "fwd":
        return jax.jit(fwd), (q, k, v)
    return fwd_bwd(fwd), (q, k, v, dout)


def tune_problem(backend: str, problem, dtype, objective: str, shapes_per_class: int,
                 max_candidates: int | None, budget_s: float) -> dict:
    """Measures the candidates of one problem; returns the tuned-table entry (not yet written)."""
    na = problem.na_problem(dtype)
    reason = backends.get(backend).supports(na)
    if reason is not None:
        raise NotImplementedError(f"{backend} does not support {problem.name}: {reason}")
    cands = candidates(backend, problem, shapes_per_class)
    if max_candidates:
        cands = cands[:max_candidates]
    flops = problem.forward_flops * (1.0 if objective == "fwd" else 3.5)
    # Every candidate's forward output is checked against the default config's before it is
    # timed: a config that computes something else (a kernel variant broken on this GPU) must
    # never win on speed. With the forward objective the timed function itself gives the output
    # (one compilation per candidate).
    def output(config, jitted, args):
        if objective == "fwd":
            return jitted(*args).astype(jnp.float32)
        q, k, v, _ = args
        op = backends.get(backend).with_config(config)
        return jax.jit(lambda q, k, v: op.attention(q, k, v, na)[0])(q, k, v).astype(jnp.float32)

    default_call = timed_call(backend, problem, None, objective, dtype)
    expected = output(None, *default_call)
    results, start = [], time.time()
    for i, cand in enumerate(cands):
        try:
            call = timed_call(backend, problem, cand.config, objective, dtype)
            got = output(cand.config, *call)
            error = float(jnp.linalg.norm(got - expected) / jnp.linalg.norm(expected))
            del got
            if not error <= MAX_REL_L2:
                _progress(f"  [{i + 1}/{len(cands)}] {cand.describe()}: REJECTED, output differs from the "
                          f"default config's (rel. L2 {error:.3g})")
                continue
            ms = budgeted_median_ms(*call, budget_s)
        except Exception as e:  # noqa: BLE001 - a config that does not compile/run is skipped
            _progress(f"  [{i + 1}/{len(cands)}] {cand.describe()}: failed ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:160]})")
            continue
        results.append((ms, cand))
        best = min(results, key=lambda r: r[0])
        eta = (time.time() - start) / (i + 1) * (len(cands) - i - 1)
        _progress(f"  [{i + 1}/{len(cands)}] {cand.describe()}: {ms:.4g} ms "
                  f"(best {best[0]:.4g} ms; ~{eta:.0f}s left)")
    if not results:
        raise RuntimeError(f"no candidate config of {backend} ran on {problem.name}")
    del expected
    default_ms = budgeted_median_ms(*default_call, budget_s)
    best_ms, best = min(results, key=lambda r: r[0])
    speeds: dict[str, tuple[dict, float]] = {}
    # The default config may be none of the candidates timed (``--max-candidates``); when it
    # measured faster than every one of them it is what the table keeps (H200, sweep-1d-k3:
    # 0.31 ms default against 0.43 ms for the best of two candidates).
    config = dataclasses.asdict(best.config)
    efficiency = best.efficiency
    if default_ms < best_ms:
        default = backends.get(backend).default_config(na)
        config, best_ms = dataclasses.asdict(default), default_ms
        efficiency = jna_tiling.tile_efficiency(problem.params, default.q_tile, default.kv_tile,
                                                getattr(default, "kv_region", False))
    for ms, cand in results:  # each class's best candidate, as TFLOP/s at full tile efficiency
        if getattr(cand.config, "kv_region", False):
            continue  # class speeds steer the aligned tile chooser; region steps are another rate
        speed = flops / (ms * 1e-3) / 1e12 / cand.efficiency
        key = jna_tuned.class_key(cand.class_fields)
        if key not in speeds or speed > speeds[key][1]:
            speeds[key] = (cand.class_fields, speed)
    return {
        "backend": backend, "rank": problem.rank, "head_dim": problem.head_dim,
        "dtype": jnp.dtype(dtype).name,
        "problem": dict(jna_tuned.problem_signature(problem.params), batch=problem.batch,
                        heads=problem.heads, name=problem.name),
        "objective": objective, "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "ms": round(best_ms, 4), "default_ms": round(default_ms, 4), "efficiency": round(efficiency, 4),
        "class_speeds": [{"class": f, "speed": float(f"{s:.4g}")} for f, s in speeds.values()],
        "candidates": len(results), "jax": jax.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _ints(text: str | None) -> tuple[int, ...] | None:
    return None if text is None else tuple(int(t) for t in text.split(",") if t)


def problems_from_args(args) -> list[problem_sets.Problem]:
    if args.shape:
        shape = _ints(args.shape)
        per_axis = lambda v, default: (v * len(shape) if len(v) == 1 else v) if v else (default,) * len(shape)
        causal = tuple(bool(int(c)) for c in args.causal.split(",")) if args.causal else (False,)
        name = f"shape{'x'.join(map(str, shape))}-k{'x'.join(map(str, _ints(args.kernel_size)))}"
        return [problem_sets.Problem(name, args.batch, args.heads, args.head_dim, shape,
                                     per_axis(_ints(args.kernel_size), None), per_axis(_ints(args.stride), 1),
                                     per_axis(_ints(args.dilation), 1), per_axis(causal, False))]
    try:
        problems = problem_sets.load(args.problems)
    except ValueError as e:
        raise SystemExit(f"--problems: {e}")
    if args.names:
        wanted = args.names.split(",")
        problems = [p for p in problems if p.name in wanted]
        missing = set(wanted) - {p.name for p in problems}
        if missing:
            raise SystemExit(f"--names: {', '.join(sorted(missing))} not in {args.problems}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--backend", required=True, choices=BACKENDS)
    parser.add_argument("--problems", default="public", help="a problem set of configs/problems")
    parser.add_argument("--names", default="", help="only these problems of the set")
    parser.add_argument("--shape", help="instead of a set: spatial shape, e.g. 128,128")
    parser.add_argument("--kernel-size", help="with --shape: one value or one per axis")
    parser.add_argument("--stride")
    parser.add_argument("--dilation")
    parser.add_argument("--causal", help="with --shape: 0/1 per axis")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--objective", default="fwd", choices=("fwd", "fwd_bwd"))
    parser.add_argument("--shapes-per-class", type=int, default=2)
    parser.add_argument("--max-candidates", type=int, default=None)
    parser.add_argument("--budget-s", type=float, default=1.0, help="timing budget per candidate")
    parser.add_argument("--table", default=None, help="tuned table to write (default: the user table, see jna.tuning.tables)")
    parser.add_argument("--dry-run", action="store_true", help="measure and print, write nothing")
    parser.add_argument("--allow-emulated", action="store_true",
                        help="write timings of an emulated device (interpret mode; for tests only)")
    args = parser.parse_args(argv)
    if args.shape and not args.kernel_size:
        parser.error("--shape needs --kernel-size")

    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0]
    if not backends.get(args.backend).runs_natively() and not (args.allow_emulated or args.dry_run):
        parser.error(f"{args.backend} does not run natively on {device.device_kind}: its timings here "
                     f"would be meaningless (pass --dry-run, or --allow-emulated for tests)")
    problems = problems_from_args(args)
    table = None
    written = []
    for n, problem in enumerate(problems):
        _progress(f"[{n + 1}/{len(problems)}] {args.backend} {problem.name} ({dtype.name}, {args.objective}) "
                  f"on {device.device_kind}")
        try:
            entry = tune_problem(args.backend, problem, dtype, args.objective, args.shapes_per_class,
                                 args.max_candidates, args.budget_s)
        except (NotImplementedError, RuntimeError) as e:
            _progress(f"  skipped: {e}")
            continue
        gain = entry["default_ms"] / entry["ms"]
        print(f"{problem.name}: best {entry['ms']} ms ({entry['config']['q_tile']} / {entry['config']['kv_tile']}), "
              f"default {entry['default_ms']} ms, x{gain:.2f}", flush=True)
        if not args.dry_run:
            table = jna_tuned.write_entry(entry, device.device_kind,
                                          None if args.table is None else pathlib.Path(args.table))
            written.append(problem.name)
    if table is not None:
        print(f"wrote {len(written)} entries to {table}")
    return 0 if written or args.dry_run else 1


if __name__ == "__main__":
    sys.exit(main())
