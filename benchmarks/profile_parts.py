"""Where the time of a fused-triton call goes: permutation, kernel, unpermutation; and configs.

    python -m benchmarks profile-triton --problems 2d-nat,2d-dinat [--configs "8x8/4x8/4/2,..."]

Config strings: ``q_tile/kv_tile/num_warps/num_stages[/p]`` with tiles written like ``8x16``;
a trailing ``/p`` forces the permuted layout.
"""

from __future__ import annotations

import argparse
import functools


import jax
import jax.numpy as jnp

import jna
from benchmarks import problems as problem_sets
from jna._src import plan as planning
from jna._src.arguments import check_call
from jna.backends.triton import fused as ft
from jna.backends import tiling
from jna.tuning.timing import median_ms


def parts(problem, config=None):
    q, k, v, _ = problem.inputs()
    call = check_call(q, k, v, problem.kernel_size, problem.stride, problem.dilation, problem.is_causal,
                      None, None, None, None)
    cfg = config or ft.default_config(call)
    plan = planning.make_plan(call.params, cfg.q_tile, cfg.kv_tile)
    dp = ft._padded_dim(call.head_dim)
    direct = ft._direct_ok(call, plan, dp, dp, cfg.direct_layout)
    st = ft._Static(plan, call.heads, call.kv_heads, dp, dp, call.scale, jnp.dtype(call.dtype), cfg, False,
                    ft._Layout(direct, plan))
    if direct:
        perm = jax.jit(lambda q, k, v: (q, k, v))
    else:
        perm = jax.jit(lambda q, k, v: (planning.permute(q, plan, "q", dp), planning.permute(k, plan, "kv", dp),
                                        planning.permute(v, plan, "kv", dp)))
    qp, kp, vp = perm(q, k, v)
    kernel = jax.jit(lambda qp, kp, vp: ft._fused(qp, kp, vp, st))
    out, lse = kernel(qp, kp, vp)
    unperm = jax.jit(lambda o: o if direct else planning.unpermute(o, plan, "q", call.spatial_shape, call.value_dim))
    full = jax.jit(functools.partial(jna.neighborhood_attention, backend=ft.FusedTriton(cfg), **problem.na_kwargs))
    t_full = median_ms(full, q, k, v, repeats=20, inner=10)
    return {
        "config": f"q{cfg.q_tile} kv{cfg.kv_tile} w{cfg.num_warps} s{cfg.num_stages}",
        "layout": "direct" if direct else "permuted",
        "eff": round(tiling.tile_efficiency(call.params, cfg.q_tile, cfg.kv_tile), 3),
        "full_ms": round(t_full, 4),
        "kernel_ms": round(median_ms(kernel, qp, kp, vp, repeats=20, inner=10), 4),
        "permute_qkv_ms": round(median_ms(perm, q, k, v, repeats=20, inner=10), 4),
        "unpermute_out_ms": round(median_ms(unperm, out, repeats=20, inner=10), 4),
    }


def _parse(text: str) -> ft.TritonConfig:
    """``q_tile/kv_tile/warps/stages[/p]`` (``p``: force the permuted layout)."""
    qt, kt, w, s, *rest = text.split("/")
    tile = lambda t: tuple(int(x) for x in t.split("x"))
    return ft.TritonConfig(tile(qt), tile(kt), int(w), int(s), int(w), 1, direct_layout=not rest)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--problems", default="2d-nat")
    parser.add_argument("--configs", default="")
    args = parser.parse_args()
    for p in problem_sets.load():
        if p.name not in args.problems.split(","):
            continue
        configs = [None] + [_parse(c) for c in args.configs.split(",") if c and len(c.split("/")[0].split("x")) == len(p.shape)]
        for cfg in configs:
            try:
                print(p.name, parts(p, cfg), flush=True)
            except Exception as e:  # noqa: BLE001
                print(p.name, cfg, "failed:", type(e).__name__, str(e)[:200], flush=True)


if __name__ == "__main__":
    main()
