"""Tests of `jna.sharding`: halo widths (host side) and sharded calls on 8 virtual CPU devices.

The multi-device cases (`jna_tests/sharding_cases.py`) run in subprocesses started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the device count is fixed when jax
starts, so it cannot be set inside this pytest process). They are split into a few groups so
pytest-xdist spreads them over its workers. Each case compares the sharded forward (out, lse)
and VJP with the unsharded call of the same backend at float32 rounding, checks the output
sharding, and inspects the compiled HLO: spatial sharding may use collective-permutes (the
halos) and nothing else, in particular no all-gather of the sharded axis; batch/head sharding
uses no collective at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import jna
from jna import semantics
from jna import sharding as js
from jna_tests import oracle
from jna_tests.sharding_cases import CASES, run_in_subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5  # max abs error relative to max(1, max |unsharded|): float32 rounding

# Groups of cases, one subprocess each (roughly balanced; interpret-mode Pallas is the slowest).
GROUPS = {
    "1d": [n for n in CASES if n.startswith("1d")],
    "2d": [n for n in CASES if n.startswith("2d")],
    "3d": [n for n in CASES if n.startswith("3d")],
    # fused-triton's 1-D offset route and batch/head sharding in `make test`; its slab route and
    # the 2-D/3-D offset routes in the slow tier (their kernels' offsets: test_query_offsets.py)
    "fused-triton": ["fused-triton-batch-head", "fused-triton-offset-1d"],
    "fused-triton-more": [n for n in CASES if n.startswith("fused-triton")
                          and n not in ("fused-triton-batch-head", "fused-triton-offset-1d")],
}
assert sorted(sum(GROUPS.values(), [])) == sorted(CASES), "every case belongs to one group"


def _check(name, row) -> list[str]:
    case = CASES[name]
    if "crash" in row:
        return [f"crashed:\n{row['crash']}"]
    if case.expect_error:
        if row.get("error") != case.expect_error:
            return [f"expected {case.expect_error}, got {row.get('error')}: {row.get('message')}"]
        return []
    problems = []
    for what, (err, scale) in row["errors"].items():
        if not err <= TOL * max(1.0, scale):
            problems.append(f"{what}: max abs err {err:.3g} vs unsharded (max |value| {scale:.3g})")
    if not row["sharding_ok"]:
        problems.append(f"output sharding {row['out_spec']} / {row['lse_spec']}, expected "
                        f"{row['want_out_spec']} / {row['want_lse_spec']}")
    for program in ("hlo_fwd", "hlo_fwd_bwd"):
        collectives = row.get(program)
        if collectives is None:
            continue
        other = set(collectives) - {"collective-permute"}
        if other:
            problems.append(f"{program} has collectives other than the halo permutes: {collectives}")
        if case.spatial_axis and row["halo"][:2] == [0, 0]:
            if collectives:
                problems.append(f"{program}: communicates without a halo: {collectives}")
        elif case.spatial_axis:
            left, right, n = row["halo"]
            if not collectives.get("collective-permute"):
                problems.append(f"{program}: no collective-permute (halo exchange) found")
            for shape in collectives.get("collective-permute", []):
                dims = [int(d) for d in shape.split("[")[1].split("]")[0].split(",")]
                if dims[1 + case.spatial_dim] not in (left, right):
                    problems.append(f"{program}: permute of {shape} is not a halo of width "
                                    f"{left}/{right} along the sharded axis")
        elif collectives:
            problems.append(f"{program}: batch/head sharding communicates: {collectives}")
    return problems


@pytest.mark.parametrize("group", [  # 1-D and 3-D in the full tier: 2-D covers the routes
    pytest.param(g, marks=pytest.mark.slow if g in ("1d", "3d", "fused-triton-more") else ()) for g in GROUPS])
def test_sharded_matches_unsharded(group):
    rows, proc = run_in_subprocess(GROUPS[group])
    failures = []
    for name in GROUPS[group]:
        if name not in rows:
            failures.append(f"{name}: no result (rc {proc.returncode})\n{proc.stderr[-3000:]}")
            continue
        failures += [f"{name}: {p}" for p in _check(name, rows[name])]
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------------------------
# Host side: halo widths against a brute-force count from the oracle's window rule
# ---------------------------------------------------------------------------------------------


def _brute_halo(length, k, s, d, causal, shards):
    n = length // shards
    mask = oracle.axis_mask(length, k, s, d, causal)  # [query, key]
    need = []
    for i in range(shards):
        keys = np.nonzero(mask[i * n:(i + 1) * n].any(axis=0))[0]
        need.append((max(0, i * n - keys.min()), max(0, keys.max() - ((i + 1) * n - 1))))
    return need


@pytest.mark.parametrize("seed", range(40))
def test_halo_widths_are_exact(seed):
    rng = np.random.default_rng(seed)
    shards = int(rng.choice([2, 3, 4, 8]))
    n = int(rng.integers(4, 13))
    length = shards * n
    k = int(rng.integers(2, min(length, 2 * n) + 1))
    d = int(rng.integers(1, max(1, length // k) + 1))
    s = int(rng.integers(1, k + 1))
    causal = bool(rng.integers(0, 2))
    params = semantics.normalize_params((length,), k, s, d, causal)
    want = _brute_halo(length, k, s, d, causal, shards)
    left, right = max(w[0] for w in want), max(w[1] for w in want)
    cfg = f"L={length} K={k} s={s} d={d} causal={causal} shards={shards}"
    if max(left, right) > n:
        with pytest.raises(ValueError, match="smaller than the halo"):
            js.halo(params, shards)
        return
    h = js.halo(params, shards)
    assert h.per_shard == tuple(want), cfg
    assert (h.left, h.right, h.shard_size) == (left, right, n), cfg
    if causal:
        assert h.right == 0, cfg
    plan = js.slab_plan(params, shards)
    if plan.ok:  # an exact slab really reproduces every own window (independent check)
        for i, start in enumerate(plan.starts):
            local = oracle.axis_mask(plan.size, k, s, d, causal)
            rows = np.arange(i * n, (i + 1) * n)
            glob = oracle.axis_mask(length, k, s, d, causal)[rows][:, start:start + plan.size]
            assert (local[rows - start] == glob).all(), cfg
            assert glob.sum() == oracle.axis_mask(length, k, s, d, causal)[rows].sum(), cfg


def test_border_shards_need_more_than_half_the_window():
    """Windows shift inward at the global border, so the first shard's right halo (8) is wider
    than an interior shard's (K - 1 - K // 2 = 7): widths come from the rules, not from K // 2."""
    h = js.halo(semantics.normalize_params((32,), 16), 4)
    assert h.per_shard == ((0, 8), (8, 7), (8, 7), (8, 0))
    assert (h.left, h.right) == (8, 8)
    h = js.halo(semantics.normalize_params((48,), 12), 4)
    assert h.per_shard == ((0, 5), (6, 5), (6, 5), (6, 0))


def test_errors():
    params = semantics.normalize_params((30,), 18)
    with pytest.raises(ValueError, match="cannot split evenly"):
        js.halo(params, 4)
    with pytest.raises(ValueError, match="smaller than the halo"):
        js.halo(semantics.normalize_params((32,), 12), 8)
    with pytest.raises(ValueError, match="spatial_dim"):
        js.halo(params, 2, dim=1)


def test_api_errors_single_device():
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:1]), ("sp",))
    q = jnp.zeros((3, 16, 2, 8))
    with pytest.raises(ValueError, match="not an axis of the mesh"):
        js.na1d(q, q, q, 5, mesh=mesh, batch_axis="data")
    with pytest.raises(ValueError, match="used twice"):
        js.na1d(q, q, q, 5, mesh=mesh, batch_axis="sp", spatial_axis="sp")
    with pytest.raises(ValueError, match="method"):
        js.na1d(q, q, q, 5, mesh=mesh, method="magic")
    # A one-device mesh is an ordinary call.
    out = js.na1d(q, q, q, 5, mesh=mesh, spatial_axis="sp", backend="reference")
    assert out.shape == q.shape


def test_partition_spec():
    from jax.sharding import PartitionSpec as P

    assert js.partition_spec(2, "data", "model", "sp", 1) == P("data", None, "sp", "model", None)
    assert js.partition_spec(1, ("a", "b"), None, "sp", trailing=False) == P(("a", "b"), "sp", None)


def test_exported():
    assert jna.sharding is js


@pytest.mark.slow
def test_bench_sharding_cpu_smoke(tmp_path):
    """`python -m benchmarks sharding` runs end to end on 8 virtual CPU devices (tiny shapes)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "sharding", "--cpu-smoke", "--repeats", "1",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "bench_sharding.json").read_text())["rows"]
    modes = {(r["problem"], r["mode"], r["devices"]) for r in rows if r.get("ok")}
    for problem in ("3d-hunyuan (tiny)", "2d-flux (tiny)"):
        for mode, devices in (("spatial", 2), ("spatial", 4), ("batch", 2), ("batch", 4)):
            assert (problem, mode, devices) in modes, (problem, mode, devices, rows)


def _route_problem(length, kernel_size, stride, dilation=1):
    import jax.numpy as jnp

    from jna._src.arguments import check_call

    x = jnp.zeros((1, length, 2, 8))
    return check_call(x, x, x, kernel_size, stride, dilation, False, None, None, None, None)


def test_spatial_routes_never_fall_back_silently(monkeypatch):
    """Explicit backends raise when neither route applies; ``auto`` falls back with a warning."""
    from jna import backends
    from jna.backends.triton import fused as fused_triton

    exact = _route_problem(48, 5, 1)  # 4 shards: the slab route is exact
    inexact = _route_problem(48, 5, 5)  # stride groups straddle the 12-row shards
    h_exact, h_inexact = js.halo(exact.params, 4), js.halo(inexact.params, 4)
    assert js.slab_plan(exact.params, 4).ok and not js.slab_plan(inexact.params, 4).ok

    assert js._spatial_route("reference", inexact, h_inexact, "auto")[1] == "offset"
    assert js._spatial_route("reference", exact, h_exact, "slab")[1] == "slab"
    with pytest.raises(NotImplementedError, match="no exact slab"):
        js._spatial_route("reference", inexact, h_inexact, "slab")
    with pytest.raises(ValueError, match="method"):
        js._spatial_route("reference", exact, h_exact, "fast")

    # What a GPU sees: fused-triton is available and `auto` resolves to it.
    from jna.backends.triton import common as triton_common
    monkeypatch.setattr(triton_common, "is_available", lambda: (True, ""))
    real_resolve = backends.resolve
    monkeypatch.setattr(backends, "resolve", lambda name, problem: fused_triton.FusedTriton() if name in (
        "auto", "fused-triton") else real_resolve(name, problem))
    # fused-triton has query offsets (issue 17): auto takes them, even where no slab is exact.
    assert js._spatial_route("fused-triton", exact, h_exact, "auto")[1] == "offset"
    assert js._spatial_route("fused-triton", inexact, h_inexact, "auto")[1] == "offset"
    assert js._spatial_route("fused-triton", exact, h_exact, "slab")[1] == "slab"
    # Neither route: 27-row shards of a dilation-2 axis (offsets need a multiple of 2) whose
    # slabs cannot keep the stride-2 x dilation-2 phase.
    neither = _route_problem(54, 3, 2, dilation=2)
    h_neither = js.halo(neither.params, 2)
    with pytest.raises(NotImplementedError, match="multiple of the dilation 2 rows.*no exact slab"):
        js._spatial_route("fused-triton", neither, h_neither, "auto")
    with pytest.warns(UserWarning, match="using backend 'reference'"):
        module, route = js._spatial_route("auto", neither, h_neither, "auto")
    assert (module.name, route) == ("reference", "offset")
    # A backend without offsets says so.
    monkeypatch.delitem(js.OFFSET_BACKENDS, "fused-triton")
    with pytest.raises(NotImplementedError, match="takes no query offset"):
        js._spatial_route("fused-triton", exact, h_exact, "offset")
