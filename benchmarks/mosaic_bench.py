"""fused-mosaic on an H100: correctness spot checks and the tile-class sweep (calibration).

    python -m benchmarks calibrate-mosaic [--skip-check] [--sweep] [--problems 1d-long,2d-flux]

1. Checks: a few shapes (1-D/2-D/3-D, stride, dilation, causal, GQA, one and two warpgroups,
   2 and 3 stages) against the reference backend: output, lse and the q/k/v gradients.
2. ``--sweep``: per public problem (D=128) and tile class (the best tile shapes of that class),
   the kernel-only forward and backward times (permutations excluded), and the implied
   relative speed per class: the data behind ``configs/fused_mosaic.json``.
   ``--write-config PATH`` stores the calibrated classes there.

The end-to-end table against cuDNN comes from ``benchmarks/gpu_check.py --backends fused-mosaic``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import pathlib
import time


import jax
import jax.numpy as jnp
import numpy as np

import jna
from jna import plan as planning
from jna import resources
from jna.arguments import check_call
from jna.backends import device, tiling
from jna.backends.mosaic import op as fused_mosaic
from jna.backends.mosaic import backward as mosaic_backward
from jna.backends.mosaic import forward as mosaic_forward
from jna.backends.mosaic.common import MosaicConfig
from jna.tuning.timing import median_ms

# (name, shape, kernel, stride, dilation, causal, heads, kv heads, head_dim, dtype, config or None)
CHECKS = (
    ("1d", (2048,), 256, 1, 1, False, 4, 4, 128, "bfloat16", None),
    ("1d-causal-dilated-gqa-1wg", (1500,), 100, 7, 3, True, 4, 1, 128, "bfloat16",
     MosaicConfig((64,), (64,), 3)),
    ("2d-strided-dilated-gqa", (64, 64), (13, 9), (1, 3), (1, 2), False, 4, 2, 64, "float16", None),
    ("2d-causal-1wg", (40, 56), 11, 2, 1, (True, False), 2, 2, 64, "bfloat16",
     MosaicConfig((8, 8), (8, 8), 3)),
    ("2d-q128-kv64", (40, 56), 11, 2, 1, (True, False), 2, 2, 64, "bfloat16",
     MosaicConfig((8, 16), (8, 8), 3)),
    ("3d", (12, 16, 20), (5, 7, 6), (2, 1, 3), (1, 2, 1), (True, False, False), 4, 2, 128,
     "bfloat16", None),
    ("3d-q64-kv128", (16, 16, 16), 6, 1, 1, False, 2, 2, 128, "bfloat16",
     MosaicConfig((4, 4, 4), (4, 8, 4), 2)),
)


def _random(shape, dtype, seed):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _problem_of(q, k, v, kernel_size, stride, dilation, is_causal):
    return check_call(q, k, v, kernel_size, stride, dilation, is_causal, None, None, None, None)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check(batch: int = 2) -> bool:
    ok = True
    print(f"{'check':28s} {'config':30s} {'out':>8s} {'lse':>8s} {'dq':>8s} {'dk':>8s} {'dv':>8s}")
    for name, shape, ks, st, dl, ca, heads, kv_heads, dim, dtype, config in CHECKS:
        q = _random((batch, *shape, heads, dim), dtype, 1)
        k = _random((batch, *shape, kv_heads, dim), dtype, 2)
        v = _random((batch, *shape, kv_heads, dim), dtype, 3)
        dout = _random((batch, *shape, heads, dim), dtype, 4)
        dlse = _random((batch, *shape, heads), jnp.float32, 5)
        try:
            problem = _problem_of(q, k, v, ks, st, dl, ca)
            config = config or fused_mosaic.default_config(problem)

            def run(fn, q, k, v):
                (out, lse), vjp = jax.vjp(fn, q, k, v)
                return out, lse, vjp((dout.astype(out.dtype), dlse))

            mine = jax.jit(functools.partial(
                run, functools.partial(fused_mosaic.attention, problem=problem, config=config)))
            ref = jax.jit(functools.partial(run, functools.partial(
                jna.neighborhood_attention, kernel_size=ks, stride=st, dilation=dl, is_causal=ca,
                return_lse=True, backend="reference")))
            up = lambda x: x.astype(jnp.float32)
            out, lse, grads = mine(q, k, v)
            r_out, r_lse, r_grads = ref(up(q), up(k), up(v))
            errs = [_rel(up(out), r_out), float(np.max(np.abs(np.asarray(lse) - np.asarray(r_lse))))]
            errs += [_rel(up(g), r) for g, r in zip(grads, r_grads)]
            good = all(np.isfinite(errs)) and errs[1] <= 2e-2 and all(
                e <= 1e-2 for i, e in enumerate(errs) if i != 1)
            cfg = f"q{config.q_tile} kv{config.kv_tile} x{config.num_stages}"
            print(f"{name:28s} {cfg:30s} " + " ".join(f"{e:8.1e}" for e in errs)
                  + f"  {'ok' if good else 'FAIL'}", flush=True)
        except Exception as e:  # keep going: report every case
            good = False
            print(f"{name:28s} ERROR {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
        ok &= bool(good)
    return ok


def public_problems(names=None) -> list[dict]:
    problems = [p for p in resources.read_json("problems", "public.json")["problems"]
                if p["head_dim"] in (64, 128)]
    return [p for p in problems if not names or p["name"] in names]


def sweep(problems, repeats: int = 10) -> list[dict]:
    """Kernel-only forward and backward times of every tile class per problem."""
    rows = []
    print(f"{'problem':15s} {'class':10s} {'tiles':30s} {'eff':>5s} {'fwd ms':>8s} {'bwd ms':>8s} "
          f"{'fwd TF/s':>8s} {'f+b TF/s':>8s}")
    for p in problems:
        b, h, d, shape = p["batch"], p["heads"], p["head_dim"], tuple(p["shape"])
        q, k, v, do = (_random((b, *shape, h, d), jnp.bfloat16, s) for s in (1, 2, 3, 4))
        problem = _problem_of(q, k, v, p["kernel_size"], p["stride"], p["dilation"], p["is_causal"])
        flops = 4.0 * b * h * math.prod(shape) * math.prod(p["kernel_size"]) * d
        caps = tiling.axis_caps(problem.params)
        for q_tokens, kv_tokens, stages, _ in fused_mosaic.launch_classes():
            shapes = [(qt, kt) for qt in tiling.tile_shapes(q_tokens, caps)
                      for kt in tiling.tile_shapes(kv_tokens, caps)]
            if not shapes:
                continue
            qt, kt = max(shapes, key=lambda s: tiling.tile_efficiency(problem.params, *s))
            config = MosaicConfig(qt, kt, stages)
            name = f"{q_tokens}/{kv_tokens}x{stages}"
            row = dict(problem=p["name"], q_tokens=q_tokens, kv_tokens=kv_tokens, stages=stages,
                       q_tile=qt, kv_tile=kt)
            try:
                st = fused_mosaic._static(problem, config, None)
                qp, dop = (planning.permute(x, st.plan, "q") for x in (q, do))
                kp, vp = (planning.permute(x, st.plan, "kv") for x in (k, v))
                fwd = jax.jit(functools.partial(mosaic_forward.forward_call, st=st))
                out, lse = fwd(qp, kp, vp)
                delta = jnp.einsum("bnhd,bnhd->bhn", out.astype(jnp.float32), dop.astype(jnp.float32))

                @jax.jit
                def bwd(qp, kp, vp, dop, lse, delta):
                    return (mosaic_backward.dq_call(qp, kp, vp, dop, lse, delta, st),
                            mosaic_backward.dkv_call(qp, kp, vp, dop, lse, delta, st))

                row["efficiency"] = round(st.plan.efficiency, 3)
                row["fwd_ms"] = median_ms(fwd, qp, kp, vp, repeats=repeats)
                row["bwd_ms"] = median_ms(bwd, qp, kp, vp, dop, lse, delta, repeats=repeats)
                f_tf = flops / row["fwd_ms"] / 1e9
                fb_tf = 3.5 * flops / (row["fwd_ms"] + row["bwd_ms"]) / 1e9
                print(f"{p['name']:15s} {name:10s} {'q' + str(qt) + ' kv' + str(kt):30s} "
                      f"{row['efficiency']:5.2f} {row['fwd_ms']:8.3f} {row['bwd_ms']:8.3f} "
                      f"{f_tf:8.1f} {fb_tf:8.1f}", flush=True)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                print(f"{p['name']:15s} {name:10s} ERROR {row['error']}", flush=True)
            rows.append(row)
    return rows


def write_config(rows, path: pathlib.Path, device_kind: str):
    """Per class: the median over problems of kernel TFLOP/s divided by tile efficiency."""
    import statistics

    flops = {p["name"]: 4.0 * p["batch"] * p["heads"] * math.prod(p["shape"])
             * math.prod(p["kernel_size"]) * p["head_dim"] for p in public_problems()}
    by_class = {}
    for r in rows:
        if "fwd_ms" in r:
            f = flops[r["problem"]] / r["efficiency"] / 1e9
            by_class.setdefault((r["q_tokens"], r["kv_tokens"], r["stages"]), []).append(
                (f / r["fwd_ms"], 3.5 * f / (r["fwd_ms"] + r["bwd_ms"])))
    old = json.loads(path.read_text()) if path.exists() else {}
    old["calibrated_on"] = f"{device_kind}, jax {jax.__version__}"
    old["classes"] = [
        {"q_tokens": q, "kv_tokens": k, "num_stages": s,
         "speed": round(statistics.median(a for a, _ in v), 1),
         "fwd_bwd_speed": round(statistics.median(b for _, b in v), 1)}
        for (q, k, s), v in by_class.items()]
    path.write_text(json.dumps(old, indent=1) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--problems", default="", help="comma-separated public problem names")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="", help="write the sweep rows as JSON here")
    parser.add_argument("--write-config", default="",
                        help="write the calibrated classes (configs/fused_mosaic.json format) here")
    args = parser.parse_args(argv)
    dev = device.default_device()
    print(f"jax {jax.__version__} on {dev.device_kind}; fused-mosaic: {fused_mosaic.is_available()}")
    if not fused_mosaic.runs_natively():
        print("needs a Hopper GPU; on CPU run `pytest jna_tests/test_fused_mosaic_sim.py`.")
        return 2
    start, ok = time.perf_counter(), True
    if not args.skip_check:
        ok = check()
        print(f"checks {'passed' if ok else 'FAILED'} ({time.perf_counter() - start:.0f} s)\n", flush=True)
    if args.sweep:
        rows = sweep(public_problems([n for n in args.problems.split(",") if n]), args.repeats)
        if args.out:
            pathlib.Path(args.out).write_text(json.dumps(rows, indent=1))
        if args.write_config:
            write_config(rows, pathlib.Path(args.write_config), dev.device_kind)
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
