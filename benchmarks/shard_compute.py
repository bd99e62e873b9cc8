"""One-device measurement of spatial sharding's per-shard compute (issue 17): fused-triton's
offset route against the slab route and the unsharded call.

    python -m benchmarks.shard_compute --out DIR [--problems 2d-flux,3d-hunyuan] [--shards 2,4,8]
        [--repeats 5] [--cpu-smoke]

Where only one GPU is lent, the P-device scaling of `jna.sharding` cannot be run; this script
predicts its compute part instead. For each problem (the public set, bf16) and shard count P,
along the axis `benchmarks.bench_sharding.choose_dim` picks, it times on ONE device, forward and
forward+backward (VJP of ``sum(out * dout)``), with `jna.tuning.timing.median_ms`:

* ``whole``: the unsharded problem, ``jna.neighborhood_attention(..., backend="fused-triton")``;
* ``offset``: every shard's computation on the offset route (as `jna.sharding._kernel_offset_shard`
  runs it): the shard's own query rows against its halo-extended key slab (left halo widened to
  the dilation, `jna.sharding._offset_halo`), cut to the rows inside the input,
  ``fused-triton.attention(q, k, v, problem, spans=...)``; the max over shards is reported;
* ``slab``: every shard's computation on the slab route (as `jna.sharding._local_spatial` runs it
  for a backend without offsets, `jna.sharding.slab_plan`): the halo-extended k/v padded and cut
  to the slab, the own queries placed in a zero slab, a plain fused-triton call on the slab, the
  own rows kept; the max over shards is reported.

The input of a shard's function is what it holds after the halo exchange (its own q rows and the
``[left halo, own, right halo]`` k/v rows, zeros beyond the input's border); the exchange itself
is not timed. Compute-only predicted efficiency: ``T_whole / (P * max_shard_ms)``. The halo that
a shard receives (k and v rows, both sides) is reported in bytes, with the time to move it at an
assumed NVLink bandwidth (``--nvlink-gbs``, default 450 GB/s per direction per GPU, H200 HGX's
NVLink 4 spec; an assumption, not a measurement); ``+comm`` efficiencies add that time with no
overlap (forward: the halo in; forward+backward: also the halo gradients back).

Correctness (fails loudly, exit status 1): every shard's output and dq rows against the rows of
the unsharded result, and the shards' dk/dv summed at their global rows against the unsharded
dk/dv: relative L2 <= 1e-2 (bf16), for both routes.

Writes ``shard_compute.json`` and ``shard_compute.md`` to ``--out`` (rewritten after every row)
and prints the markdown. ``--cpu-smoke`` runs tiny problems (`bench_sharding.SMOKE`) on the CPU in
Pallas interpret mode, float32: a check that the script works, not a measurement.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import subprocess
import sys
import traceback

if "--cpu-smoke" in sys.argv:
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import jax.numpy as jnp

from benchmarks import problems as problem_sets
from benchmarks.bench_sharding import RTOL, SMOKE, _functions, _log, choose_dim
from jna import backends
from jna import sharding as js
from jna._src import plan as planning
from jna._src.arguments import check_call
from jna.tuning.timing import median_ms

NVLINK_GBS = 450.0  # GB/s per direction per GPU (assumed: H200 HGX NVLink 4, 900 GB/s bidirectional)


def _git_commit() -> str:
    root = pathlib.Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _rel_l2(got, want) -> float:
    """Relative L2 error, on the device in float32 (the arrays are large)."""
    got, want = jnp.asarray(got, jnp.float32), jnp.asarray(want, jnp.float32)
    return float(jnp.linalg.norm(got - want) / jnp.maximum(jnp.linalg.norm(want), 1e-30))


def _rows(x, axis, start, size):
    return jax.lax.slice_in_dim(x, start, start + size, axis=axis)


def _extended(x, axis, start, stop):
    """Global rows ``[start, stop)`` of ``x`` along ``axis``, zeros outside the input (what a
    shard holds after `jna.sharding._exchange`)."""
    length = x.shape[axis]
    lo, hi = max(start, 0), min(stop, length)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (lo - start, stop - hi)
    return jnp.pad(_rows(x, axis, lo, hi - lo), pad)


def _vjp_fn(fn):
    """jit of ``fn``'s output and the VJP of its ``out`` (lse gets no cotangent), as
    `bench_sharding._functions` times forward+backward."""
    def fwd_bwd(q, k, v, dout):
        out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v)[0], q, k, v)
        return out, pullback(dout)

    return jax.jit(lambda q, k, v: fn(q, k, v)[0]), jax.jit(fwd_bwd)


def offset_shard_fns(problem, module, h: js.Halo, i: int):
    """Shard ``i``'s offset-route computation (`jna.sharding._kernel_offset_shard`'s branch ``i``)
    on its own q rows and its ``h.extent`` halo-extended k/v rows. ``h``: the widened halo."""
    dim, n, length = h.dim, h.shard_size, h.length
    axis = 1 + dim
    first = i * n - h.left
    kv_start, kv_stop = max(0, first), min(length, (i + 1) * n + h.right)
    spans = [None] * problem.rank
    spans[dim] = planning.AxisSpan(i * n, n, kv_start, kv_stop - kv_start)
    spans = tuple(spans)

    def fn(q, k_ext, v_ext):
        cut = lambda x: jax.lax.slice_in_dim(x, kv_start - first, kv_stop - first, axis=axis)
        return module.attention(q, cut(k_ext), cut(v_ext), problem, spans=spans)

    return _vjp_fn(fn)


def slab_shard_fns(problem, module, h: js.Halo, plan: js.SlabPlan):
    """The slab route's shard computation (`jna.sharding._local_spatial`, ``method="slab"``); the
    shard index is an argument (traced, as there), so all shards share one compilation."""
    dim, n = h.dim, h.shard_size
    axis = 1 + dim
    size = plan.size
    starts = jnp.asarray(plan.starts, jnp.int32)

    def fn(index, q, k_ext, v_ext):
        own_start = index * n
        slab_start = starts[index]
        pad = [(0, 0)] * k_ext.ndim
        pad[axis] = (size, size)
        kv_first = slab_start - (own_start - h.left) + size

        def cut(x):
            x = jnp.pad(x, pad)
            return jax.lax.dynamic_slice_in_dim(x, kv_first, size, axis=axis)

        k_slab, v_slab = cut(k_ext), cut(v_ext)
        q_shape = list(q.shape)
        q_shape[axis] = size
        q_slab = jax.lax.dynamic_update_slice_in_dim(jnp.zeros(q_shape, q.dtype), q, own_start - slab_start,
                                                     axis)
        p = problem.params
        local = check_call(q_slab, k_slab, v_slab, p.kernel_size, p.stride, p.dilation, p.is_causal,
                           problem.scale, None, None, problem.rank)
        out, lse = module.attention(q_slab, k_slab, v_slab, local)
        out = jax.lax.dynamic_slice_in_dim(out, own_start - slab_start, n, axis=axis)
        lse = jax.lax.dynamic_slice_in_dim(lse, own_start - slab_start, n, axis=axis)
        return out, lse

    def fwd(index, q, k, v):
        return fn(index, q, k, v)[0]

    def fwd_bwd(index, q, k, v, dout):
        out, pullback = jax.vjp(lambda q, k, v: fn(index, q, k, v)[0], q, k, v)
        return out, pullback(dout)

    return jax.jit(fwd), jax.jit(fwd_bwd)


def halo_bytes(problem, h: js.Halo, dtype) -> dict:
    """Bytes of the k and v halo rows a shard receives (uniform widths, as the ppermutes send)."""
    other = math.prod(s for a, s in enumerate(problem.spatial_shape) if a != h.dim)
    per_row = problem.batch * other * problem.kv_heads * (problem.head_dim + problem.value_dim)
    per_row *= jnp.dtype(dtype).itemsize
    total = (h.left + h.right) * per_row
    return dict(left_rows=h.left, right_rows=h.right, bytes=total,
                fwd_ms=total / (NVLINK_GBS * 1e9) * 1e3,
                # the backward sends the halo gradients (k's and v's dtype) back to their owners
                fwd_bwd_ms=2 * total / (NVLINK_GBS * 1e9) * 1e3)


def measure_problem(problem_def, shard_counts, dtype, repeats, emit):
    q, k, v, dout = (jax.device_put(x) for x in problem_def.inputs(dtype))
    problem = check_call(q, k, v, problem_def.kernel_size, problem_def.stride, problem_def.dilation,
                         problem_def.is_causal, None, None, None, None)
    module = backends.resolve("fused-triton", problem)
    params = problem.params
    name = problem_def.name

    _log(f"{name}: whole problem")
    fwd, fwd_bwd = _functions(problem_def, "fused-triton", None)
    whole = {"fwd_ms": median_ms(fwd, q, k, v, repeats=repeats),
             "fwd_bwd_ms": median_ms(fwd_bwd, q, k, v, dout, repeats=repeats)}
    ref_out, (ref_dq, ref_dk, ref_dv) = fwd_bwd(q, k, v, dout)
    del fwd, fwd_bwd
    emit(dict(problem=name, shards=1, route="whole", **whole))
    failures = []

    for shards in shard_counts:
        dim = choose_dim(params, shards)
        base = dict(problem=name, shards=shards, dim=dim)
        if dim is None:
            emit(dict(base, route="-", skipped="no spatial axis splits evenly with halo <= shard"))
            continue
        h = js.halo(params, shards, dim)
        axis, n = 1 + dim, h.shard_size
        routes = []
        why = js.OFFSET_BACKENDS["fused-triton"](params, h)
        if why is None:
            routes.append(("offset", js._offset_halo(params, h)))
        else:
            emit(dict(base, route="offset", skipped=why))
        plan = js.slab_plan(params, shards, dim)
        if plan.ok:
            routes.append(("slab", h))
        else:
            emit(dict(base, route="slab", skipped=plan.reason))
        if plan.ok:
            slab_fns = slab_shard_fns(problem, module, h, plan)
        for route, hr in routes:
            _log(f"  {shards} shards along axis {dim}: {route} route (halo {hr.left}/{hr.right}, shard {n})")
            row = dict(base, route=route, halo=[hr.left, hr.right, n], comm=halo_bytes(problem, hr, dtype))
            if route == "slab":
                row["slab_rows"] = plan.size
            try:
                per_shard = []
                sum_dk = jnp.zeros(ref_dk.shape, jnp.float32)
                sum_dv = jnp.zeros(ref_dv.shape, jnp.float32)
                errs = {"out": 0.0, "dq": 0.0}
                for i in range(shards):
                    own = lambda x: _rows(x, axis, i * n, n)
                    first, stop = i * n - hr.left, (i + 1) * n + hr.right
                    qs, ds = own(q), own(dout)
                    ks, vs = (_extended(x, axis, first, stop) for x in (k, v))
                    if route == "offset":
                        f, fb = offset_shard_fns(problem, module, hr, i)
                        args = (qs, ks, vs)
                    else:
                        f, fb = slab_fns
                        args = (jnp.int32(i), qs, ks, vs)
                    t = {"fwd_ms": median_ms(f, *args, repeats=repeats),
                         "fwd_bwd_ms": median_ms(fb, *args, ds, repeats=repeats)}
                    out, (dq, dk, dv) = fb(*args, ds)
                    errs["out"] = max(errs["out"], _rel_l2(out, own(ref_out)))
                    errs["dq"] = max(errs["dq"], _rel_l2(dq, own(ref_dq)))
                    lo, hi = max(first, 0), min(stop, h.length)
                    inside = lambda g: _rows(g, axis, lo - first, hi - lo).astype(jnp.float32)
                    index = [slice(None)] * sum_dk.ndim
                    index[axis] = slice(lo, hi)
                    sum_dk = sum_dk.at[tuple(index)].add(inside(dk))
                    sum_dv = sum_dv.at[tuple(index)].add(inside(dv))
                    per_shard.append(t)
                    del f, fb
                errs["dk"] = _rel_l2(sum_dk, ref_dk)
                errs["dv"] = _rel_l2(sum_dv, ref_dv)
            except Exception as e:  # noqa: BLE001 - recorded, and the run fails
                traceback.print_exc()
                emit(dict(row, error=f"{type(e).__name__}: {e}"))
                failures.append(f"{name} P={shards} {route}: {type(e).__name__}: {e}")
                continue
            row["per_shard"] = per_shard
            for mode in ("fwd", "fwd_bwd"):
                worst = max(t[f"{mode}_ms"] for t in per_shard)
                row[f"{mode}_max_ms"] = worst
                row[f"{mode}_eff"] = whole[f"{mode}_ms"] / (shards * worst)
                row[f"{mode}_eff_comm"] = whole[f"{mode}_ms"] / (shards * (worst + row["comm"][f"{mode}_ms"]))
            row["rel_l2"] = errs
            row["ok"] = all(e <= RTOL for e in errs.values())
            if not row["ok"]:
                failures.append(f"{name} P={shards} {route}: rel L2 {errs} > {RTOL}")
            emit(row)
    return failures


def run(args) -> tuple[dict, list[str]]:
    dtype = jnp.float32 if args.cpu_smoke else jnp.bfloat16
    names = [n for n in args.problems.split(",") if n]
    public = {p.name: p for p in problem_sets.load()}
    shard_counts = [int(s) for s in args.shards.split(",") if s]
    dev = jax.devices()[0]
    rows = []
    result = dict(
        meta=dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  jax=jax.__version__, device=str(dev.device_kind), platform=dev.platform,
                  commit=_git_commit(), backend="fused-triton", dtype=jnp.dtype(dtype).name,
                  repeats=args.repeats, nvlink_gbs_assumed=NVLINK_GBS, rtol=RTOL,
                  cpu_smoke=args.cpu_smoke),
        rows=rows, failures=[])

    def emit(row):
        rows.append(row)
        save(result, args.out)

    for name in names:
        problem_def = SMOKE[name] if args.cpu_smoke else public[name]
        try:
            result["failures"] += measure_problem(problem_def, shard_counts, dtype, args.repeats, emit)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            result["failures"].append(f"{name}: {type(e).__name__}: {e}")
        save(result, args.out)
    return result, result["failures"]


def save(result: dict, out_dir: str) -> str:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "shard_compute.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (out / "shard_compute.md").write_text(text)
    return text


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [
        f"# Per-shard compute of spatial sharding on one device ({m['device']}, jax {m['jax']}, "
        f"{m['backend']}, {m['dtype']}, commit {m['commit']}, {m['date']})", "",
        "Times: median ms of one call (`median_ms`, {} repeats). `whole`: the unsharded problem; "
        "`offset`/`slab`: the slowest shard's compute on that route (halo exchange not timed). "
        "eff = T_whole / (P * max shard); eff+comm adds the halo's transfer at an ASSUMED "
        "{:.0f} GB/s per direction (no overlap; fwd+bwd also sends the halo gradients back). "
        "Check: max relative L2 over out, dq (per shard) and dk, dv (shards summed) against the "
        "unsharded result, <= {}.".format(m["repeats"], m["nvlink_gbs_assumed"], m["rtol"]), "",
        "| problem | P | axis | route | halo L/R (shard rows) | computed q rows | fwd ms | fwd eff | "
        "fwd eff+comm | fwd+bwd ms | fwd+bwd eff | fwd+bwd eff+comm | halo MB (fwd comm ms) | "
        "max rel L2 | check |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        head = [r["problem"], str(r["shards"]), str(r.get("dim", "")), r["route"]]
        if "skipped" in r or "error" in r:
            what = f"skipped: {r['skipped']}" if "skipped" in r else f"ERROR: {r['error'][:150]}"
            cells = [""] * 10 + [what]
        elif r["route"] == "whole":
            cells = ["", "all", f"{r['fwd_ms']:.3f}", "", "", f"{r['fwd_bwd_ms']:.3f}", "", "", "", "", ""]
        else:
            hl, hr_, n = r["halo"]
            c = r["comm"]
            cells = [f"{hl}/{hr_} ({n})", str(r.get("slab_rows", n)), f"{r['fwd_max_ms']:.3f}",
                     f"{r['fwd_eff']:.2f}", f"{r['fwd_eff_comm']:.2f}", f"{r['fwd_bwd_max_ms']:.3f}",
                     f"{r['fwd_bwd_eff']:.2f}", f"{r['fwd_bwd_eff_comm']:.2f}",
                     f"{c['bytes'] / 1e6:.1f} ({c['fwd_ms']:.3f})", f"{max(r['rel_l2'].values()):.2e}",
                     "ok" if r["ok"] else "FAIL"]
        lines.append("| " + " | ".join(head + cells) + " |")
    if result["failures"]:
        lines += ["", "**FAILURES:**", *[f"- {f}" for f in result["failures"]]]
    return "\n".join(lines) + "\n"


def main() -> int:
    global NVLINK_GBS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for shard_compute.json/.md")
    parser.add_argument("--problems", default="2d-flux,3d-hunyuan")
    parser.add_argument("--shards", default="2,4,8", help="shard counts P")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--nvlink-gbs", type=float, default=NVLINK_GBS,
                        help="ASSUMED NVLink bandwidth per direction per GPU, GB/s (for the halo's time)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny problems on the CPU, interpret mode, float32 (checks the script)")
    args = parser.parse_args()
    NVLINK_GBS = args.nvlink_gbs
    result, failures = run(args)
    print(save(result, args.out))
    if failures:
        print("shard_compute: FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
