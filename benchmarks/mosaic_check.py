"""fused-mosaic on a Hopper GPU: correctness spot checks against the reference backend.

    python -m benchmarks check-mosaic

A few shapes (1-D/2-D/3-D, stride, dilation, causal, GQA, one and two warpgroups, 2 and 3
stages): output, lse and the q/k/v gradients. The launch-class calibration is
``python -m benchmarks calibrate --backend fused-mosaic``; the end-to-end table against cuDNN
comes from ``python -m benchmarks gpu-check --backends fused-mosaic``.
"""

from __future__ import annotations

import argparse
import functools
import time


import jax
import jax.numpy as jnp
import numpy as np

import jna
from jna._src import resources
from jna._src.arguments import check_call
from jna.backends import device
from jna.backends.mosaic import op as fused_mosaic
from jna.backends.mosaic.common import MosaicConfig

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    dev = device.default_device()
    print(f"jax {jax.__version__} on {dev.device_kind}; fused-mosaic: {fused_mosaic.is_available()}")
    if not fused_mosaic.runs_natively():
        print("needs a Hopper GPU; on CPU run `pytest jna_tests/test_fused_mosaic_sim.py`.")
        return 2
    start = time.perf_counter()
    ok = check()
    print(f"checks {'passed' if ok else 'FAILED'} ({time.perf_counter() - start:.0f} s)", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
