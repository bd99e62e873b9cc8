"""Calibrates the launch classes of configs/fused_triton.json on the current GPU.

    python -m benchmarks calibrate-triton [--write configs/fused_triton.json] [--out DIR]

Each class is timed on a 1-D blocked problem (stride = kernel = 1024 tokens, so every tile size
divides the windows and tile efficiency is 1.0) at head_dim = the class' max_head_dim, bf16.
Its forward TFLOP/s becomes the class' ``speed``, which the tile chooser multiplies by a
problem's tile efficiency.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys


import jax
import jax.numpy as jnp

import jna
from jna.backends.triton import fused as ft
from jna.tuning.timing import median_ms

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "fused_triton.json"


def dump(raw: dict) -> str:
    """The config JSON with one line per class (readable diffs)."""
    head = {k: v for k, v in raw.items() if k != "classes"}
    lines = ["{"] + [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
    lines.append(' "classes": [')
    lines.append(",\n".join(f"  {json.dumps(c)}" for c in raw["classes"]))
    lines += [" ]", "}"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", default="", help="write the calibrated JSON here")
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=16)
    args = parser.parse_args()

    raw = json.loads(CONFIG.read_text())
    rows = []
    for entry in raw["classes"]:
        c = ft.LaunchClass(**entry)
        dim = c.max_head_dim
        shape = (args.batch, args.length, args.heads, dim)
        keys = jax.random.split(jax.random.key(0), 4)
        q, k, v, dout = (jax.random.normal(key, shape, jnp.float32).astype(jnp.bfloat16) for key in keys)
        cfg = ft.TritonConfig((c.q_tokens,), (c.kv_tokens,), c.num_warps, c.num_stages,
                              c.bwd_num_warps, c.bwd_num_stages)
        fn = functools.partial(jna.na1d, kernel_size=args.window, stride=args.window, backend=ft.FusedTriton(cfg))
        flops = 4.0 * args.batch * args.heads * args.length * args.window * dim

        def loss(q, k, v, dout):
            return jnp.sum(fn(q, k, v).astype(jnp.float32) * dout.astype(jnp.float32))

        fwd = jax.jit(fn)
        bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        try:
            t_fwd = median_ms(fwd, q, k, v, repeats=15, inner=5)
            t_bwd = median_ms(bwd, q, k, v, dout, repeats=10, inner=3)
        except Exception as e:  # noqa: BLE001 - a class that fails to compile gets speed 0
            print(f"class {entry} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            entry["speed"] = 0
            continue
        entry["speed"] = round(flops / (t_fwd * 1e-3) / 1e12, 1)
        entry["fwd_bwd_speed"] = round(3.5 * flops / (t_bwd * 1e-3) / 1e12, 1)
        rows.append(entry)
        print(f"D{dim:>4} q{c.q_tokens:>4} kv{c.kv_tokens:>4} w{c.num_warps} s{c.num_stages}: "
              f"fwd {t_fwd:.3f} ms {entry['speed']} TFLOP/s | fwd+bwd {t_bwd:.3f} ms "
              f"{entry['fwd_bwd_speed']} TFLOP/s", flush=True)
    raw["calibrated_on"] = f"{jax.devices()[0].device_kind}, jax {jax.__version__}"
    if args.write:
        pathlib.Path(args.write).write_text(dump(raw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
