"""Scaling model of sharded NA on paper: halo bytes vs compute per shard, predicted efficiency.

``python -m benchmarks sharding-model [--markdown PATH]`` prints the tables of docs/sharding.md
for the public problems 1d-long, 2d-flux and 3d-hunyuan on 2/4/8 GPUs. Nothing runs on a device:

* halo widths come from `jna.sharding.halo` (exact, from the window rules);
* halo bytes per shard and direction of the forward pass: K and V rows of the halo, bf16
  (``(left + right) * cross-section * H_kv * (D + D_v) * 2``); forward+backward sends the same
  again (the halo gradients go back to their owners; the compiled HLO has 2 collective-permutes
  forward and 2 more backward, see the tests);
* compute time per shard scales the measured one-GPU time (fused-triton on an H100) by the
  (query, key) pairs the shard's tiles compute, relative to the whole problem, with the tile
  shapes the one-GPU run used. This captures tile waste of smaller per-shard extents: a shard's
  Q tiles start at its first row and its KV tiles at the first halo row (``native offset``), or
  the shard runs a whole NA problem on its slab (``slab``, what fused-triton does today);
* communication time: bytes / 450 GB/s (realistic NVLink per GPU and direction on H100 SXM) plus
  15 us latency per message;
* 8 GPUs also as a 2-D mesh, 2 head shards x 4 spatial shards (head sharding moves nothing and
  halves both the halo and the compute);
* efficiency = T_1 / (P * T_P), with T_P = compute + communication (no overlap) or
  max(compute, communication) (halo exchange overlapped with the interior tiles).
"""

from __future__ import annotations

import argparse
import math

from benchmarks.problems import load
from jna._src import plan as planning
from jna import semantics
from jna import sharding as js

# One-GPU H100 fused-triton times (ms) and tile shapes (README / benchmarks/results).
MEASURED = {
    "1d-long": dict(fwd=1.52, fwd_bwd=8.69, q_tile=(128,), kv_tile=(64,)),
    "2d-flux": dict(fwd=17.35, fwd_bwd=87.95, q_tile=(8, 16), kv_tile=(8, 8)),
    "3d-hunyuan": dict(fwd=89.7, fwd_bwd=458.5, q_tile=(8, 4, 4), kv_tile=(2, 8, 4)),
}
LINK_BYTES_PER_S = 450e9
LATENCY_S = 15e-6
GPUS = (2, 4, 8)


def _shard_computed_pairs(params, dim, a, b, key_first, q_tile, kv_tile) -> int:
    """(query, key) pairs computed on axis ``dim`` by Q tiles of rows [a, b) over KV tiles that
    start at global row ``key_first`` (dilation 1)."""
    length, k, s, d, causal = params.axis(dim)
    assert d == 1, "the model covers dilation 1"
    total = 0
    for lo in range(a, b, q_tile):
        hi = min(lo + q_tile, b) - 1
        first = semantics.window_start(lo, length, k, s, 1, causal) - key_first
        last = semantics.window_stop(hi, length, k, s, 1, causal) - 1 - key_first
        total += q_tile * kv_tile * (last // kv_tile - first // kv_tile + 1)
    return total


def shard_compute_fraction(params, h: js.Halo, q_tile, kv_tile, route: str) -> float:
    """Worst shard's computed pairs on the sharded axis over the whole axis' (tile waste incl.)."""
    dim = h.dim
    length, k, s, d, causal = params.axis(dim)
    whole = planning.axis_pair_counts(length, k, s, d, causal, q_tile[dim], kv_tile[dim])[1]
    if route == "slab":
        plan = js.slab_plan(params, h.num_shards, dim)
        sub = planning.axis_pair_counts(plan.size, k, s, d, causal, q_tile[dim], kv_tile[dim])[1]
        return sub / whole
    n = h.shard_size
    worst = max(_shard_computed_pairs(params, dim, i * n, (i + 1) * n, i * n - h.left,
                                      q_tile[dim], kv_tile[dim]) for i in range(h.num_shards))
    return worst / whole


def rows(problems=("1d-long", "2d-flux", "3d-hunyuan")):
    out = []
    for p in load():
        if p.name not in problems:
            continue
        m = MEASURED[p.name]
        params = semantics.normalize_params(p.shape, **p.na_kwargs)
        layouts = [(gpus, 1) for gpus in GPUS] + [(8, 2)]  # (GPUs, head shards); 8 = 2 heads x 4
        for gpus, head_shards in layouts:
            shards = gpus // head_shards
            heads = p.heads // head_shards
            for dim in range(params.rank):
                row = dict(problem=p.name, gpus=gpus, head_shards=head_shards, dim=dim,
                           length=p.shape[dim])
                try:
                    h = js.halo(params, shards, dim)
                except ValueError as e:
                    row["error"] = "halo > shard" if "halo" in str(e) else "not divisible"
                    out.append(row)
                    continue
                cross = p.batch * math.prod(n for a, n in enumerate(p.shape) if a != dim)
                row_bytes = cross * heads * (2 * p.head_dim) * 2  # K and V, bf16
                fwd_bytes = (h.left + h.right) * row_bytes
                comm_fwd = fwd_bytes / LINK_BYTES_PER_S + 2 * LATENCY_S
                row.update(shard=h.shard_size, left=h.left, right=h.right,
                           halo_mib=fwd_bytes / 2**20, comm_fwd_ms=comm_fwd * 1e3,
                           gflop_shard=4 * p.batch * heads * (p.tokens // shards)
                           * math.prod(p.kernel_size) * p.head_dim / 1e9)
                for route in ("offset", "slab"):
                    if route == "slab" and not js.slab_plan(params, shards, dim).ok:
                        continue
                    frac = shard_compute_fraction(params, h, m["q_tile"], m["kv_tile"], route)
                    if route == "slab":
                        row["slab_rows"] = js.slab_plan(params, shards, dim).size
                    for mode, comm_factor in (("fwd", 1), ("fwd_bwd", 2)):
                        t1 = m[mode]
                        compute = t1 * frac / head_shards
                        comm = comm_fwd * 1e3 * comm_factor
                        row[f"{route}_{mode}_compute_ms"] = compute
                        row[f"{route}_{mode}_eff_serial"] = t1 / (gpus * (compute + comm))
                        row[f"{route}_{mode}_eff_overlap"] = t1 / (gpus * max(compute, comm))
                out.append(row)
    return out


def best_rows(all_rows):
    """Per (problem, gpus): the sharded axis with the best native-offset forward efficiency."""
    best = {}
    for r in all_rows:
        key = (r["problem"], r["gpus"], r["head_shards"])
        if "error" in r:
            prev = best.get(key)
            if prev is None or "error" in prev:
                why = f"axis {r['dim']}: {r['error']}"
                best[key] = dict(r, error=f"{prev['error']}; {why}" if prev else why)
            continue
        cur = best.get(key)
        if cur is None or "error" in cur or r["offset_fwd_eff_serial"] > cur["offset_fwd_eff_serial"]:
            best[key] = r
    return list(best.values())


def _layout(r) -> str:
    if r["head_shards"] == 1:
        return str(r["gpus"])
    return f"{r['gpus']} ({r['head_shards']} heads x {r['gpus'] // r['head_shards']} spatial)"


def markdown(all_rows) -> str:
    lines = ["### Halo widths and bytes (every shardable axis)", "",
             "| problem | GPUs | axis (length) | rows/shard | halo left/right | halo KV bytes fwd (MiB) | comm fwd (ms) | GFLOP/shard fwd |",
             "|---|---|---|---|---|---|---|---|"]
    for r in all_rows:
        head = f"| {r['problem']} | {_layout(r)} | {r['dim']} ({r['length']}) |"
        if "error" in r:
            lines.append(f"{head} — | {r['error']} | | | |")
            continue
        lines.append(f"{head} {r['shard']} | {r['left']}/{r['right']} | {r['halo_mib']:.1f} | "
                     f"{r['comm_fwd_ms']:.3f} | {r['gflop_shard']:.0f} |")
    lines += ["", "### Predicted efficiency (best axis per problem and GPU count)", "",
              "Efficiency = T_1 / (P T_P). *offset*: a kernel with a query offset (native; the "
              "`reference` route's design, not yet in fused-triton); *slab*: fused-triton today "
              "(whole NA problem on the shard's slab). Serial: exchange then compute; overlap: "
              "exchange hidden behind compute.", "",
              "| problem | GPUs | axis | fwd compute/shard (ms), offset | fwd eff offset serial / overlap | fwd+bwd eff offset serial / overlap | slab rows | fwd eff slab (serial) | fwd+bwd eff slab (serial) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in best_rows(all_rows):
        if "error" in r:
            lines.append(f"| {r['problem']} | {_layout(r)} | none ({r['error']}) | | | | | | |")
            continue
        slab = ("—", "—", "—")
        if "slab_fwd_eff_serial" in r:
            slab = (str(r["slab_rows"]), f"{r['slab_fwd_eff_serial']:.2f}", f"{r['slab_fwd_bwd_eff_serial']:.2f}")
        lines.append(
            f"| {r['problem']} | {_layout(r)} | {r['dim']} | {r['offset_fwd_compute_ms']:.2f} | "
            f"{r['offset_fwd_eff_serial']:.2f} / {r['offset_fwd_eff_overlap']:.2f} | "
            f"{r['offset_fwd_bwd_eff_serial']:.2f} / {r['offset_fwd_bwd_eff_overlap']:.2f} | "
            f"{slab[0]} | {slab[1]} | {slab[2]} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", help="also write the tables to this path")
    args = parser.parse_args()
    text = markdown(rows())
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
