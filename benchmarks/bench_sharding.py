"""Benchmark of sharded NA (`jna.sharding`): spatial halo exchange, Ulysses and batch parallel.

    python -m benchmarks sharding --out DIR [--problems 3d-hunyuan,2d-flux] [--gpus 1,2,4]
        [--backend auto] [--method auto[,ulysses,...]] [--repeats 10] [--cpu-smoke]

For each problem, forward and forward+backward (VJP of ``sum(out * dout)``) are timed
(median of synchronized repeats after warm-up, `jna.tuning.timing.median_ms`):

* on one device (the baseline, batch 1 and batch 4);
* ``1`` in ``--gpus``: through `jna.sharding` on a mesh of one device (the sharded code path with
  empty halos, against the plain call);
* spatially sharded over P devices (each P of ``--gpus`` above 1), once per method of
  ``--method`` (a comma-separated list of `jna.sharding.METHODS`: ``auto``, ``offset``, ``slab``,
  ``ulysses``), along the axis with the smallest halo per shard row (``--spatial-dim``
  overrides; where no halo fits, the first axis that splits evenly, which only Ulysses can run).
  Each row names the route the call took (`jna.sharding.spatial_route`: ``auto`` resolves to
  ``offset``, ``slab`` or ``ulysses``), the `jna.sharding.halo` widths (halo routes), and the
  bytes one shard sends in the forward pass by `jna.sharding.route_bytes` (the halo's K and V,
  or Ulysses' all-to-alls of q, k, v, out and lse);
* batch-sharded: batch 4 over P devices (no communication).

Every sharded result (output and the q/k/v gradients) is checked against the single-device one:
relative L2 error <= 1e-2 in bf16 (the suite's half-type tolerance); a failed check is reported in the table
and makes the script exit non-zero. Writes ``bench_sharding.json`` and ``bench_sharding.md`` to
``--out`` and prints the markdown.

``--cpu-smoke`` runs tiny versions of the problems on 8 virtual CPU devices (float32, the
``reference`` backend under ``auto``; 4 heads, so that Ulysses splits them over 2 and 4
devices): a check that the script works, not a measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import sys
import traceback

if "--cpu-smoke" in sys.argv:  # before jax starts: the device count is fixed at start-up
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"


import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

import jna
from benchmarks import problems as problem_sets
from jna import sharding as js
from jna.tuning.timing import median_ms

RTOL = 1e-2
SMOKE = {
    "3d-hunyuan": problem_sets.Problem("3d-hunyuan (tiny)", 1, 4, 16, (8, 8, 16), (3, 4, 4),
                                       (1, 1, 1), (1, 1, 1), (False, False, False)),
    "2d-flux": problem_sets.Problem("2d-flux (tiny)", 1, 4, 16, (32, 32), (5, 5), (1, 1), (1, 1),
                                    (False, False)),
}


def _log(*args):
    print(*args, flush=True, file=sys.stderr)


def _rel_l2(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def choose_dim(params, gpus: int) -> int | None:
    """The spatial axis with the smallest halo per own row that ``gpus`` shards can take."""
    best = None
    for dim in range(params.rank):
        try:
            h = js.halo(params, gpus, dim)
        except ValueError:
            continue
        cost = (h.left + h.right) / h.shard_size
        if best is None or cost < best[0]:
            best = (cost, dim)
    return None if best is None else best[1]


def even_dim(params, gpus: int) -> int | None:
    """The first spatial axis that ``gpus`` shards split evenly (what Ulysses needs: its bytes do
    not depend on the axis), or None."""
    return next((d for d in range(params.rank) if params.spatial_shape[d] % gpus == 0), None)


def parse_methods(text: str) -> list[str]:
    """``--method``: comma-separated names of `jna.sharding.METHODS`."""
    methods = [m for m in text.split(",") if m]
    bad = [m for m in methods if m not in js.METHODS]
    if bad or not methods:
        raise argparse.ArgumentTypeError(f"--method {text!r}: each must be one of {js.METHODS}")
    return methods


def _functions(problem, backend, shard_kw):
    kw = problem.na_kwargs

    def fwd(q, k, v):
        if shard_kw is None:
            return jna.neighborhood_attention(q, k, v, **kw, backend=backend)
        return js.neighborhood_attention(q, k, v, **kw, backend=backend, **shard_kw)

    def fwd_bwd(q, k, v, dout):
        out, pullback = jax.vjp(fwd, q, k, v)
        return out, pullback(dout)

    return jax.jit(fwd), jax.jit(fwd_bwd)


def measure(problem, backend, batch, devices, shard_kw, dtype, repeats, reference=None):
    """Times fwd and fwd+bwd; compares with ``reference`` (the single-device outputs)."""
    p = dataclasses.replace(problem, batch=batch)
    q, k, v, dout = p.inputs(dtype)
    fwd, fwd_bwd = _functions(p, backend, shard_kw)
    if shard_kw is not None:
        mesh = shard_kw["mesh"]
        spec = js.partition_spec(len(p.shape), shard_kw.get("batch_axis"), None,
                                 shard_kw.get("spatial_axis"), shard_kw.get("spatial_dim", 0))
        q, k, v, dout = (jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v, dout))
    else:
        q, k, v, dout = (jax.device_put(x, devices[0]) for x in (q, k, v, dout))
    row = {"fwd_ms": median_ms(fwd, q, k, v, repeats=repeats),
           "fwd_bwd_ms": median_ms(fwd_bwd, q, k, v, dout, repeats=repeats)}
    out, grads = fwd_bwd(q, k, v, dout)
    outputs = [np.asarray(jnp.asarray(x, jnp.float32)) for x in (out, *grads)]
    if reference is not None:
        errs = {name: _rel_l2(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), outputs, reference)}
        row["rel_l2"] = errs
        row["ok"] = all(e <= RTOL for e in errs.values())
    return row, outputs


def run(args) -> dict:
    devices = jax.devices()
    dtype = jnp.float32 if args.cpu_smoke else jnp.bfloat16
    names = [n for n in args.problems.split(",") if n]
    public = {p.name: p for p in problem_sets.load()}
    gpus = [int(g) for g in args.gpus.split(",")]
    rows = []
    result = dict(
        meta=dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  jax=jax.__version__, device=str(devices[0].device_kind), num_devices=len(devices),
                  backend=args.backend, method=",".join(args.method), dtype=jnp.dtype(dtype).name,
                  cpu_smoke=args.cpu_smoke),
        rows=rows)

    def emit(row):
        """Records a row and rewrites the results (a run cut off by a time limit keeps its rows)."""
        rows.append(row)
        save(result, args.out)
    for name in names:
        problem = SMOKE[name] if args.cpu_smoke else public[name]
        params = jna.semantics.normalize_params(problem.shape, **problem.na_kwargs)
        for batch in (1, args.batch):
            _log(f"{problem.name}: batch {batch} on one device")
            base, ref = measure(problem, args.backend, batch, devices, None, dtype, args.repeats)
            emit(dict(problem=problem.name, mode="single", devices=1, batch=batch, **base))
            runs = []  # (entry, shard_kw): one spatial run per method, or one batch run
            for g in gpus:
                # g == 1 runs the sharded code path on a mesh of one device (shard_map, halo of
                # zero rows): its overhead over the plain call, where only one GPU is lent.
                if g > len(devices):
                    _log(f"  skip {g} devices: only {len(devices)}")
                    continue
                if batch == 1:
                    for method in args.method:
                        entry = dict(problem=problem.name, mode="spatial", devices=g, batch=batch,
                                     method=method)
                        dim = args.spatial_dim if args.spatial_dim is not None else choose_dim(params, g)
                        if dim is None and method in ("auto", "ulysses"):
                            dim = even_dim(params, g)  # no halo fits: Ulysses may still run
                        entry["dim"] = dim
                        if dim is None:
                            emit(dict(entry, error="no spatial axis can be split (halo > shard)"))
                            continue
                        shard_kw = dict(mesh=Mesh(np.array(devices[:g]), ("sp",)), spatial_axis="sp",
                                        spatial_dim=dim, method=method)
                        runs.append((entry, shard_kw))
                else:
                    if batch % g:
                        continue
                    entry = dict(problem=problem.name, mode="batch", devices=g, batch=batch)
                    runs.append((entry, dict(mesh=Mesh(np.array(devices[:g]), ("data",)),
                                             batch_axis="data")))
            for entry, shard_kw in runs:
                g = entry["devices"]
                if entry["mode"] == "spatial":
                    try:
                        entry.update(_route_info(problem, params, dtype, args.backend, shard_kw))
                    except (ValueError, NotImplementedError) as e:
                        emit(dict(entry, error=f"{type(e).__name__}: {e}"))
                        continue
                _log(f"  {entry['mode']} over {g} devices" +
                     (f" ({entry['method']} -> {entry['route']})" if "route" in entry else ""))
                try:
                    row, _ = measure(problem, args.backend, batch, devices, shard_kw, dtype,
                                     args.repeats, reference=ref)
                except Exception as e:  # noqa: BLE001 - recorded in the results
                    traceback.print_exc()
                    emit(dict(entry, error=f"{type(e).__name__}: {e}"))
                    continue
                for mode in ("fwd", "fwd_bwd"):
                    row[f"{mode}_efficiency"] = base[f"{mode}_ms"] / (g * row[f"{mode}_ms"])
                emit(dict(entry, **row))
    return result


def _route_info(problem, params, dtype, backend, shard_kw) -> dict:
    """The route a spatial run takes, its halo widths (halo routes) and the bytes one shard
    sends in the forward pass (`jna.sharding.route_bytes`); raises what the call would."""
    q = jax.ShapeDtypeStruct((1, *problem.shape, problem.heads, problem.head_dim), dtype)
    route = js.spatial_route(q, q, q, **problem.na_kwargs, backend=backend, **shard_kw)
    g, dim = shard_kw["mesh"].shape["sp"], shard_kw["spatial_dim"]
    info = dict(route=route)
    if route is None:  # a one-device mesh: the sharded code path with empty halos
        h = js.halo(params, g, dim)
        info["halo"] = [h.left, h.right, h.shard_size]
        return info
    model = js.route_bytes(params, g, dim, batch=1, heads=problem.heads, head_dim=problem.head_dim,
                           dtype=dtype)
    if route == "ulysses":
        info["comm_mib"] = model["ulysses"] / 2**20
    else:
        h = js.halo(params, g, dim)
        info["halo"] = [h.left, h.right, h.shard_size]
        info["comm_mib"] = model["halo"] / 2**20
    return info


def save(result: dict, out_dir: str) -> str:
    """Writes bench_sharding.json and .md into ``out_dir``; returns the markdown."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_sharding.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (out / "bench_sharding.md").write_text(text)
    return text


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [f"# jna.sharding benchmark ({m['device']} x{m['num_devices']}, jax {m['jax']}, "
             f"backend {m['backend']}, method {m['method']}, {m['dtype']}, {m['date']})", "",
             "Route: the method asked -> the route taken (`auto` picks by `jna.sharding.route_bytes`). "
             "MiB/shard: bytes one shard sends in the forward pass (the model; fwd+bwd sends twice "
             "that).", "",
             "| problem | mode | devices | batch | method -> route | axis | halo L/R (rows/shard) | "
             "MiB/shard fwd | fwd ms | fwd eff | fwd+bwd ms | fwd+bwd eff | max rel L2 | check |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        route = ""
        if "method" in r:
            route = r["method"] + (f" -> {r['route']}" if r.get("route") and r["route"] != r["method"] else "")
        if "error" in r:
            lines.append(f"| {r['problem']} | {r['mode']} | {r['devices']} | {r['batch']} | {route} | "
                         f"{r.get('dim', '')} | | | | | | | | error: {r['error'][:120]} |")
            continue
        halo = f"{r['halo'][0]}/{r['halo'][1]} ({r['halo'][2]})" if "halo" in r else ""
        comm = f"{r['comm_mib']:.1f}" if "comm_mib" in r else ""
        eff = lambda key: f"{r[key]:.2f}" if key in r else ""
        err = f"{max(r['rel_l2'].values()):.2e}" if "rel_l2" in r else ""
        check = "" if "ok" not in r else ("ok" if r["ok"] else "FAIL")
        lines.append(f"| {r['problem']} | {r['mode']} | {r['devices']} | {r['batch']} | {route} | "
                     f"{r.get('dim', '')} | {halo} | {comm} | {r['fwd_ms']:.3f} | {eff('fwd_efficiency')} | "
                     f"{r['fwd_bwd_ms']:.3f} | {eff('fwd_bwd_efficiency')} | {err} | {check} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for bench_sharding.json/.md")
    parser.add_argument("--problems", default="3d-hunyuan,2d-flux")
    parser.add_argument("--gpus", default="1,2,4", help="device counts to shard over")
    parser.add_argument("--batch", type=int, default=4, help="batch of the batch-sharded runs")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--method", default=["auto"], type=parse_methods,
                        help=f"spatial route(s), comma-separated, of {', '.join(js.METHODS)}")
    parser.add_argument("--spatial-dim", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny shapes on 8 virtual CPU devices (checks the script, not speed)")
    args = parser.parse_args()
    result = run(args)
    text = save(result, args.out)
    print(text)
    bad = [r for r in result["rows"] if "error" in r or r.get("ok") is False]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
