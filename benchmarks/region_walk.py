"""fused-triton's key-region walk against its aligned KV tiles on this GPU (issue 16).

    python -m benchmarks region-walk [--names 2d-nat,sweep-2d-k7] [--top 3] [--out DIR]

Per problem (bf16; the public, models and paper-sweep sets): the default config (aligned KV
tiles), the same tiles with ``kv_region=True``, and the ``--top`` region candidates of
`FusedTriton.candidate_configs` with the best ``region tile efficiency x class speed``: forward
and forward+backward medians, effective TFLOP/s, the memory floor, and each variant's output and
gradients against the default config's (relative L2). Writes ``region_walk.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp

from benchmarks import harness
from jna.backends import tiling
from jna.backends.triton import fused as ft
from jna.tuning import problem_sets
from jna.tuning.timing import fwd_bwd, median_ms

SETS = ("public", "models", "paper_sweeps", "tiny")
DEFAULT_NAMES = ("2d-nat,2d-dinat,nat-tiny-s2,dinat-tiny-s3,sweep-1d-k3,sweep-1d-k127,sweep-2d-k3,"
                 "sweep-2d-k7,sweep-2d-k13,sweep-3d-k7")


def _describe(cfg) -> str:
    tiles = f"q{'x'.join(map(str, cfg.q_tile))} kv{'x'.join(map(str, cfg.kv_tile))}"
    return f"{tiles} w{cfg.num_warps}s{cfg.num_stages} {'region' if cfg.kv_region else 'aligned'}"


def variants(na, top: int) -> list:
    """The default config (on an H200 a tuned region config for the small-window problems), it
    with the other walk (region <-> aligned), and the ``top`` best region candidates."""
    default = ft.default_config(na)
    out = [default]
    other = dataclasses.replace(default, kv_region=not default.kv_region)
    if default.kv_region or ft.region_applies(na, other):
        out.append(other)
    classes = {tuple(sorted(c.fields.items())): c.speed for c in ft.launch_classes()}
    scored = [(eff * classes.get(tuple(sorted(fields.items())), 1.0), cfg)
              for fields, cfg, eff in ft.FusedTriton().candidate_configs(na, 2) if cfg.kv_region]
    for _, cfg in sorted(scored, key=lambda t: -t[0]):
        if len(out) >= top + 2:
            break
        if cfg not in out:
            out.append(cfg)
    return out


def run_problem(problem, top: int) -> list[dict]:
    na = problem.na_problem(jnp.bfloat16)
    q, k, v, dout = problem.inputs(jnp.bfloat16)
    rows, ref = [], None
    for cfg in variants(na, top):
        fwd = jax.jit(lambda q, k, v, cfg=cfg: ft.attention(q, k, v, na, cfg)[0])
        grads = fwd_bwd(lambda q, k, v, cfg=cfg: ft.attention(q, k, v, na, cfg)[0])
        out = fwd(q, k, v)
        g = grads(q, k, v, dout)
        flat = [out, *jax.tree_util.tree_leaves(g)]
        if ref is None:
            ref = flat
        err = max(float(jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(b.astype(jnp.float32)))
                  for a, b in zip(flat, ref))
        # batched samples (calls of ~0.1 ms are otherwise all host dispatch and sync)
        fwd_ms = median_ms(fwd, q, k, v, warmup=3, repeats=30, inner=20)
        bwd_ms = median_ms(grads, q, k, v, dout, warmup=3, repeats=30, inner=20)
        region = cfg.kv_region and ft.region_applies(na, cfg)
        rows.append(dict(
            problem=problem.name, config=_describe(cfg), kv_region=cfg.kv_region,
            efficiency=round(tiling.tile_efficiency(na.params, cfg.q_tile, cfg.kv_tile, region), 3),
            fwd_ms=round(fwd_ms, 4), fwd_bwd_ms=round(bwd_ms, 4),
            fwd_tflops=round(problem.forward_flops / fwd_ms / 1e9, 2),
            fwd_bwd_tflops=round(3.5 * problem.forward_flops / bwd_ms / 1e9, 2),
            fwd_floor_ms=problem.floor_ms("fwd"), fwd_bwd_floor_ms=problem.floor_ms("fwd_bwd"),
            max_rel_l2_vs_default=float(f"{err:.2g}")))
        print(rows[-1], flush=True)
    return rows


def markdown(rows, device: str) -> str:
    lines = [f"fused-triton key-region walk vs aligned KV tiles, {device}, jax {jax.__version__}, bf16", "",
             "| problem | config | tile eff | fwd ms (TF/s) | fwd+bwd ms (TF/s) | floor fwd / fwd+bwd ms "
             "| rel L2 vs default |", "|---|---|---|---|---|---|---|"]
    fmt = lambda x: "-" if x is None else f"{x:.3g}"
    for r in rows:
        lines.append(f"| {r['problem']} | {r['config']} | {r['efficiency']} | {r['fwd_ms']:.4f} ({r['fwd_tflops']}) "
                     f"| {r['fwd_bwd_ms']:.4f} ({r['fwd_bwd_tflops']}) | {fmt(r['fwd_floor_ms'])} / "
                     f"{fmt(r['fwd_bwd_floor_ms'])} | {r['max_rel_l2_vs_default']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--names", default=DEFAULT_NAMES)
    parser.add_argument("--top", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    problems = {p.name: p for s in SETS for p in problem_sets.load(s)}
    missing = [n for n in args.names.split(",") if n not in problems]
    if missing:
        raise SystemExit(f"--names: unknown problems {missing}")
    rows = []
    for name in args.names.split(","):
        rows += run_problem(problems[name], args.top)
    device = jax.devices()[0].device_kind
    text = markdown(rows, device)
    print(text)
    if args.out:
        harness.write_results(args.out, "region_walk", rows, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
