"""Scaling model of sharded NA on paper: halo / all-to-all bytes vs compute per shard, efficiency.

``python -m benchmarks sharding-model [--markdown PATH]`` prints the tables of docs/sharding.md
for the public problems 1d-long, 2d-flux and 3d-hunyuan on 2/4/8 GPUs. Nothing runs on a device:

* halo widths come from `jna.sharding.halo` (exact, from the window rules);
* halo bytes per shard and direction of the forward pass: K and V rows of the halo, bf16
  (``(left + right) * cross-section * H_kv * (D + D_v) * 2``); forward+backward sends the same
  again (the halo gradients go back to their owners; the compiled HLO has 2 collective-permutes
  forward and 2 more backward, see the tests);
* compute time per shard scales the measured one-GPU time (fused-triton on an H200) by the
  (query, key) pairs the shard's tiles compute, relative to the whole problem, with the tile
  shapes the one-GPU run used. This captures tile waste of smaller per-shard extents: a shard's
  Q tiles start at its first row and its KV tiles at the first halo row (``native offset``), or
  the shard runs a whole NA problem on its slab (``slab``, what fused-triton does today);
* communication time: bytes / 450 GB/s (realistic NVLink per GPU and direction on H100 SXM) plus
  15 us latency per message;
* 8 GPUs also as a 2-D mesh, 2 head shards x 4 spatial shards (head sharding moves nothing and
  halves both the halo and the compute);
* efficiency = T_1 / (P * T_P), with T_P = compute + communication (no overlap) or
  max(compute, communication) (halo exchange overlapped with the interior tiles);
* halo routes vs Ulysses (`ulysses_rows`): bytes per shard from `jna.sharding.route_bytes` (the
  rule of ``method="auto"``); the halo route's compute per shard as measured on one H200
  (`MEASURED_SHARDS`, benchmarks/shard_compute.py: the slowest shard of the offset route), where
  measured; Ulysses' compute per shard ``T_1 / P`` (each device runs the whole grid with ``H / P``
  heads: the one-GPU tiling, a ``P``-th of the programs), its communication the all-to-all bytes
  at the same 450 GB/s plus 15 us per all_to_all (5 forward: q, k, v, out, lse; twice that
  forward+backward). Left out: the all_to_all's local pack/unpack copies (XLA transposes the
  split axis to the front; about 2 x the shard's q, k, v, out bytes through HBM, ~0.1 ms on
  2d-flux over 8 GPUs, ~4% of its compute) and NVSwitch contention.
"""

from __future__ import annotations

import argparse
import math

from benchmarks.problems import load
from jna._src import plan as planning
from jna import semantics
from jna import sharding as js

# One-GPU H200 fused-triton times (ms, bf16) and tile shapes: 1d-long from
# benchmarks/results/h200_bench_public_2026-11-29.md, 2d-flux and 3d-hunyuan the `whole` rows of
# benchmarks/results/h200_offsets_2026-12-01/shard_compute.md (same code as the per-shard rows).
MEASURED = {
    "1d-long": dict(fwd=1.509, fwd_bwd=8.558, q_tile=(128,), kv_tile=(64,)),
    "2d-flux": dict(fwd=17.409, fwd_bwd=88.097, q_tile=(8, 16), kv_tile=(8, 8)),
    "3d-hunyuan": dict(fwd=91.042, fwd_bwd=444.450, q_tile=(8, 4, 4), kv_tile=(2, 8, 4)),
}
# The slowest shard's compute on the offset route (fused-triton, bf16), measured one shard at a
# time on one H200 (benchmarks/results/h200_offsets_2026-12-01/shard_compute.md):
# (problem, shards) -> (sharded axis, fwd ms, fwd+bwd ms).
MEASURED_SHARDS = {
    ("2d-flux", 2): (0, 9.358, 45.559),
    ("2d-flux", 4): (0, 5.228, 24.502),
    ("3d-hunyuan", 2): (2, 46.284, 217.546),
    ("3d-hunyuan", 4): (2, 25.675, 110.763),
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
              "Efficiency = T_1 / (P T_P). *offset*: a kernel with a query offset (the "
              "`reference` route and, since issue 17, fused-triton's); *slab*: the fused backends "
              "without offsets (whole NA problem on the shard's slab). Serial: exchange then "
              "compute; overlap: exchange hidden behind compute.", "",
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


ULYSSES_MESSAGES = 5  # forward all_to_alls: q, k, v in; out, lse back


def ulysses_rows(problems=("2d-flux", "3d-hunyuan")):
    """Halo route vs Ulysses per (problem, GPUs): bytes per shard (`jna.sharding.route_bytes`,
    the rule of ``method="auto"``), and predicted efficiency (serial: communication, then compute).

    The halo route's compute is the measured slowest shard (`MEASURED_SHARDS`) where there is one,
    on the axis measured, else the best axis with the tile-pair model of `rows`; Ulysses' is
    ``T_1 / P`` on any axis that splits evenly (its bytes do not depend on the axis).
    """
    model_rows = {(r["problem"], r["gpus"], r["head_shards"], r["dim"]): r for r in rows(problems)}
    out = []
    for p in load():
        if p.name not in problems:
            continue
        m = MEASURED[p.name]
        params = semantics.normalize_params(p.shape, **p.na_kwargs)
        for gpus in GPUS:
            row = dict(problem=p.name, gpus=gpus)
            dims = [d for d in range(params.rank) if p.shape[d] % gpus == 0]
            if not dims:
                row["error"] = f"no axis of {p.shape} splits {gpus} ways"
                out.append(row)
                continue
            per_dim = {d: js.route_bytes(params, gpus, d, batch=p.batch, heads=p.heads,
                                         head_dim=p.head_dim) for d in dims}
            halo_dims = [d for d in dims if per_dim[d]["halo"] is not None]
            measured = MEASURED_SHARDS.get((p.name, gpus))
            if measured is not None:
                halo_dim = measured[0]
            elif halo_dims:  # the best axis by the tile-pair model
                halo_dim = max(halo_dims, key=lambda d: model_rows[(p.name, gpus, 1, d)]["offset_fwd_eff_serial"])
            else:
                halo_dim = None
            ulysses_bytes = per_dim[dims[0]]["ulysses"]
            row.update(ulysses_mib=ulysses_bytes / 2**20)
            for mode, factor in (("fwd", 1), ("fwd_bwd", 2)):
                t1 = m[mode]
                comm = factor * (ulysses_bytes / LINK_BYTES_PER_S + ULYSSES_MESSAGES * LATENCY_S) * 1e3
                row[f"ulysses_{mode}_compute_ms"] = t1 / gpus
                row[f"ulysses_{mode}_comm_ms"] = comm
                row[f"ulysses_{mode}_eff"] = t1 / (gpus * (t1 / gpus + comm))
            if halo_dim is None:
                row["halo_error"] = "halo > shard on every axis that splits evenly"
                row["auto"] = "ulysses"
                four = MEASURED_SHARDS.get((p.name, 4))
                if gpus == 8 and four is not None:
                    # The halo route's 8-GPU layout: 2 head shards x 4 spatial shards (a 2-D mesh);
                    # head sharding halves the 4-shard compute and the halo bytes.
                    b = js.route_bytes(params, 4, four[0], batch=p.batch, heads=p.heads // 2,
                                       head_dim=p.head_dim)
                    row.update(halo_layout="2 heads x 4 spatial", halo_dim=four[0],
                               halo_mib=b["halo"] / 2**20, halo_source="measured / 2")
                    for i, mode in enumerate(("fwd", "fwd_bwd")):
                        comm = (1 + i) * (b["halo"] / LINK_BYTES_PER_S + 2 * LATENCY_S) * 1e3
                        row[f"halo_{mode}_compute_ms"] = four[1 + i] / 2
                        row[f"halo_{mode}_comm_ms"] = comm
                        row[f"halo_{mode}_eff"] = m[mode] / (gpus * (four[1 + i] / 2 + comm))
                out.append(row)
                continue
            b = per_dim[halo_dim]
            row.update(halo_dim=halo_dim, halo_mib=b["halo"] / 2**20, auto=b["fewer"].replace("halo", "offset"),
                       halo_source="measured" if measured else "tile model")
            for i, mode in enumerate(("fwd", "fwd_bwd")):
                t1 = m[mode]
                factor = 1 + i
                comm = factor * (b["halo"] / LINK_BYTES_PER_S + 2 * LATENCY_S) * 1e3
                compute = measured[1 + i] if measured else model_rows[(p.name, gpus, 1, halo_dim)][f"offset_{mode}_compute_ms"]
                row[f"halo_{mode}_compute_ms"] = compute
                row[f"halo_{mode}_comm_ms"] = comm
                row[f"halo_{mode}_eff"] = t1 / (gpus * (compute + comm))
            out.append(row)
    return out


def ulysses_markdown(urows) -> str:
    lines = ["### Halo (offset route) vs Ulysses", "",
             "MiB: bytes one shard sends in the forward pass (`jna.sharding.route_bytes`); *auto*: "
             "the route `method=\"auto\"` takes (fewer bytes). Efficiency T_1 / (P T_P), serial "
             "(communication, then compute); halo compute per shard *measured* on one H200 "
             "(slowest shard) where available; Ulysses compute T_1 / P.", "",
             "| problem | GPUs | halo axis | halo MiB | Ulysses MiB | auto | halo fwd ms (compute + comm) | "
             "halo fwd eff | halo fwd+bwd eff | Ulysses fwd ms (compute + comm) | Ulysses fwd eff | "
             "Ulysses fwd+bwd eff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in urows:
        if "error" in r:
            lines.append(f"| {r['problem']} | {r['gpus']} | none ({r['error']}) | | | | | | | | | |")
            continue
        u = (f"{r['ulysses_mib']:.1f} | ", f"{r['ulysses_fwd_compute_ms']:.2f} + {r['ulysses_fwd_comm_ms']:.2f} | "
             f"{r['ulysses_fwd_eff']:.2f} | {r['ulysses_fwd_bwd_eff']:.2f} |")
        if "halo_error" in r and "halo_layout" not in r:
            lines.append(f"| {r['problem']} | {r['gpus']} | none (halo > shard) | — | {u[0]}ulysses | — | — | — | {u[1]}")
            continue
        src = {"measured": "", "measured / 2": " (measured 4-shard / 2)"}.get(r["halo_source"], " (model)")
        axis = (f"{r['halo_dim']}" if "halo_layout" not in r else
                f"none on 8 spatial shards; {r['halo_dim']} as {r['halo_layout']}")
        lines.append(
            f"| {r['problem']} | {r['gpus']} | {axis} | {r['halo_mib']:.1f} | {u[0]}{r['auto']} | "
            f"{r['halo_fwd_compute_ms']:.2f}{src} + {r['halo_fwd_comm_ms']:.2f} | {r['halo_fwd_eff']:.2f} | "
            f"{r['halo_fwd_bwd_eff']:.2f} | {u[1]}")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", help="also write the tables to this path")
    args = parser.parse_args()
    text = markdown(rows()) + "\n" + ulysses_markdown(ulysses_rows())
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
