"""Tests of `jna.sharding`'s Ulysses route (``method="ulysses"``, all-to-all) and its byte model.

The multi-device cases (`jna_tests.sharding_cases.ULYSSES_CASES`) run in a subprocess with 8
virtual CPU devices, as in `test_sharding.py`: each compares the sharded forward (out, lse) and
VJP (q, k, v, additional keys/values) with the unsharded call of the same backend at float32
rounding, checks the output sharding and the route taken, and inspects the compiled HLO: the
route must use all-to-alls whose operands hold a shard's rows (never the whole sharded axis), and
no all-gather or collective-permute. The byte model (`jna.sharding.route_bytes`), the route that
``method="auto"`` picks and the errors are checked on the host (abstract meshes and shapes: no
device needed).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from jna import semantics
from jna import sharding as js
from jna_tests.sharding_cases import ULYSSES_CASES, run_in_subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5  # max abs error relative to max(1, max |unsharded|): float32 rounding

# One subprocess per group. The fast group covers 2-D (GQA, dilation, stride, causal), auto's
# choice of Ulysses where no halo fits, and the errors; the slow group the rest.
FAST = ["ulysses-2d-gqa-dilated-strided-causal", "ulysses-1d-auto-halo-too-wide",
        "ulysses-heads-not-divisible", "ulysses-kv-heads-not-divisible"]
GROUPS = {
    "fast": FAST,
    "slow": [n for n in ULYSSES_CASES if n not in FAST and not n.startswith("ulysses-fused-triton")],
    "fused-triton": [n for n in ULYSSES_CASES if n.startswith("ulysses-fused-triton")],
}
assert sorted(sum(GROUPS.values(), [])) == sorted(ULYSSES_CASES), "every case belongs to one group"


def _dims(shape: str) -> list[int]:
    return [int(d) for d in shape.split("[")[1].split("]")[0].split(",") if d]


def _check(name, row) -> list[str]:
    case = ULYSSES_CASES[name]
    if "crash" in row:
        return [f"crashed:\n{row['crash']}"]
    if case.expect_error:
        if row.get("error") != case.expect_error:
            return [f"expected {case.expect_error}, got {row.get('error')}: {row.get('message')}"]
        size = dict(case.mesh)[case.spatial_axis]
        for part in ("heads", f"spatial_axis={case.spatial_axis!r}", f"divisible by {size}"):
            if part not in row["message"]:
                return [f"error message does not name {part!r}: {row['message']}"]
        return []
    problems = []
    if row.get("route") != case.expect_route:
        problems.append(f"route {row.get('route')!r}, expected {case.expect_route!r}")
    for what, (err, scale) in row["errors"].items():
        if not err <= TOL * max(1.0, scale):
            problems.append(f"{what}: max abs err {err:.3g} vs unsharded (max |value| {scale:.3g})")
    if not row["sharding_ok"]:
        problems.append(f"output sharding {row['out_spec']} / {row['lse_spec']}, expected "
                        f"{row['want_out_spec']} / {row['want_lse_spec']}")
    n = case.shape[case.spatial_dim] // dict(case.mesh)[case.spatial_axis]
    for program in ("hlo_fwd", "hlo_fwd_bwd"):
        collectives = row.get(program)
        if collectives is None:
            continue
        if not collectives.get("all-to-all"):
            problems.append(f"{program}: no all-to-all")
        # The replicated additional keys/values get their gradients summed over the shards.
        allowed = {"all-to-all"} | ({"all-reduce"} if program == "hlo_fwd_bwd" and case.n_extra else set())
        if set(collectives) - allowed:
            problems.append(f"{program} has collectives other than all-to-all: {collectives}")
        for shape in collectives.get("all-to-all", []):
            # CPU all-to-alls carry one operand per device: a shard's rows of a head block.
            if _dims(shape)[1 + case.spatial_dim] != n:
                problems.append(f"{program}: all-to-all operand {shape} does not hold a shard's "
                                f"{n} rows of the sharded axis")
    return problems


@pytest.mark.parametrize("group", [
    pytest.param(g, marks=() if g == "fast" else pytest.mark.slow) for g in GROUPS])
def test_ulysses_matches_unsharded(group):
    rows, proc = run_in_subprocess(GROUPS[group])
    failures = []
    for name in GROUPS[group]:
        if name not in rows:
            failures.append(f"{name}: no result (rc {proc.returncode})\n{proc.stderr[-3000:]}")
            continue
        failures += [f"{name}: {p}" for p in _check(name, rows[name])]
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------------------------
# Host side: the byte model, auto's choice, errors
# ---------------------------------------------------------------------------------------------

MiB = 2**20


def test_route_bytes_public_problems():
    """The worked examples of docs/sharding.md (bf16, batch 1, 24 heads, D = D_v = 128)."""
    flux = semantics.normalize_params((256, 256), 80)
    hunyuan = semantics.normalize_params((30, 48, 80), (18, 24, 24))
    kw = dict(heads=24, head_dim=128)
    # 2d-flux, axis 0: halo 40 + 39 rows of 256 tokens, K and V (2 * 128 * 2 bytes) per kv head.
    for p in (2, 4):
        b = js.route_bytes(flux, p, 0, **kw)
        assert b["halo"] == 79 * 256 * 24 * 256 * 2
        n = 256 // p
        assert b["ulysses"] == (p - 1) * n * 256 * (48 * 256 * 2 + 24 * 4) // p
        assert b["fewer"] == "halo"
    assert round(js.route_bytes(flux, 2, 0, **kw)["ulysses"] / MiB, 1) == 385.5
    eight = js.route_bytes(flux, 8, 0, **kw)
    assert eight["halo"] is None and "smaller than the halo" in eight["halo_error"]
    assert eight["ulysses"] == 7 * 32 * 256 * (48 * 256 * 2 + 96) // 8 and eight["fewer"] == "ulysses"
    # 3d-hunyuan, axis 2 (80): halo 12 + 11 rows of 30 x 48 tokens.
    for p in (2, 4):
        b = js.route_bytes(hunyuan, p, 2, **kw)
        assert b["halo"] == 23 * 30 * 48 * 24 * 256 * 2 and b["fewer"] == "halo"
        assert b["ulysses"] == (p - 1) * (80 // p) * 30 * 48 * (48 * 256 * 2 + 96) // p
    b = js.route_bytes(hunyuan, 8, 2, **kw)  # 10-row shards, 12-row halo
    assert b["halo"] is None and b["fewer"] == "ulysses"
    with pytest.raises(ValueError, match="cannot split evenly"):  # 30 rows: neither route
        js.route_bytes(hunyuan, 4, 0, **kw)


def test_route_bytes_against_a_count_of_blocks():
    """Independent count: every tensor of a shard is cut into P head blocks, P - 1 go away; the
    halo is K and V of the rows `halo` lists, per cross-section token and kv head."""
    rng = np.random.default_rng(0)
    for _ in range(30):
        shards = int(rng.choice([2, 4, 8]))
        length = shards * int(rng.integers(4, 12))
        other = int(rng.integers(1, 5))
        k = int(rng.integers(2, length // 2 + 1))
        if other > 1:  # 2-D, sharded along axis 0, cross-section `other`
            params = semantics.normalize_params((length, other), (k, 2))
        else:
            params = semantics.normalize_params((length,), k)
        kv = int(rng.choice([1, 2, 4, 8]))
        heads = kv * int(rng.choice([1, 2]))
        batch, d, dv = int(rng.integers(1, 3)), int(rng.choice([8, 16])), int(rng.choice([8, 12]))
        dtype = rng.choice(["bfloat16", "float32"])
        b = js.route_bytes(params, shards, 0, batch=batch, heads=heads, kv_heads=kv, head_dim=d,
                           value_dim=dv, dtype=dtype)
        item = jnp.dtype(dtype).itemsize
        n = length // shards
        tokens = batch * n * math.prod(params.spatial_shape[1:])
        if heads % shards or kv % shards:
            assert b["ulysses"] is None and "not divisible" in b["ulysses_error"]
        else:
            shard_bytes = [tokens * heads * d * item, tokens * kv * d * item, tokens * kv * dv * item,
                           tokens * heads * dv * item, tokens * heads * 4]  # q, k, v, out, lse
            sent = sum(x // shards * (shards - 1) for x in shard_bytes)
            assert b["ulysses"] == sent
        try:
            h = js.halo(params, shards, 0)
        except ValueError:
            assert b["halo"] is None
        else:
            assert b["halo"] == (h.left + h.right) * (tokens // n) * kv * (d + dv) * item
        want = ("ulysses" if b["ulysses"] is not None and (b["halo"] is None or b["ulysses"] < b["halo"])
                else "halo" if b["halo"] is not None else None)
        assert b["fewer"] == want


def _shapes(batch, shape, heads, kv_heads, d=16, dtype=jnp.float32):
    s = lambda h: jax.ShapeDtypeStruct((batch, *shape, h, d), dtype)
    return s(heads), s(kv_heads), s(kv_heads)


def test_auto_picks_by_bytes():
    mesh = lambda p: AbstractMesh((p,), ("sp",))
    # 2d-flux: the halo moves less on 2 and 4 shards; on 8 no halo fits (shards of 32 rows).
    flux = _shapes(1, (256, 256), 24, 24, 128, jnp.bfloat16)
    assert [js.spatial_route(*flux, 80, mesh=mesh(p), spatial_axis="sp") for p in (2, 4, 8)] == \
        ["offset", "offset", "ulysses"]
    hunyuan = _shapes(1, (30, 48, 80), 24, 24, 128, jnp.bfloat16)
    assert js.spatial_route(*hunyuan, (18, 24, 24), mesh=mesh(4), spatial_axis="sp", spatial_dim=2) == "offset"
    assert js.spatial_route(*hunyuan, (18, 24, 24), mesh=mesh(8), spatial_axis="sp", spatial_dim=1) == "ulysses"
    # A halo exists (8-row shards, K 16: 8 | 8 rows at the first shard) but moves more than the
    # all-to-all: (l + r) = 16 rows > 2 n (P-1)/P = 14 rows' worth.
    q, k, v = _shapes(1, (64,), 8, 8)
    params = semantics.normalize_params((64,), 16)
    b = js.route_bytes(params, 8, heads=8, head_dim=16, dtype=jnp.float32)
    assert b["halo"] is not None and b["ulysses"] < b["halo"] and b["fewer"] == "ulysses"
    assert js.spatial_route(q, k, v, 16, mesh=mesh(8), spatial_axis="sp") == "ulysses"
    assert js.spatial_route(q, k, v, 3, mesh=mesh(8), spatial_axis="sp") == "offset"
    # ... unless the heads do not divide: then the halo route, whatever it moves.
    q6 = _shapes(1, (64,), 4, 4)
    assert js.spatial_route(*q6, 16, mesh=mesh(8), spatial_axis="sp") == "offset"
    # GQA: Ulysses moves q and out with all query heads, the halo only kv heads.
    gqa = _shapes(1, (64,), 16, 8)
    b = js.route_bytes(params, 8, heads=16, kv_heads=8, head_dim=16, dtype=jnp.float32)
    assert b["fewer"] == "halo"
    assert js.spatial_route(*gqa, 16, mesh=mesh(8), spatial_axis="sp") == "offset"
    # Explicit methods are taken as asked; head sharding first divides the heads.
    assert js.spatial_route(q, k, v, 3, mesh=mesh(8), spatial_axis="sp", method="ulysses") == "ulysses"
    assert js.spatial_route(q, k, v, 16, mesh=mesh(8), spatial_axis="sp", method="offset") == "offset"
    two_d = AbstractMesh((2, 4), ("model", "sp"))
    assert js.spatial_route(q, k, v, 3, mesh=two_d, head_axis="model", spatial_axis="sp",
                            method="ulysses") == "ulysses"
    assert js.spatial_route(q, k, v, 3, mesh=mesh(1), spatial_axis="sp") is None  # one shard


def test_ulysses_errors():
    mesh4 = AbstractMesh((4,), ("sp",))
    q, k, v = _shapes(1, (16,), 6, 6)
    with pytest.raises(NotImplementedError, match=r"spatial_axis='sp'.*heads \(6\) and kv heads \(6\)"
                                                  r".*not divisible by 4"):
        js.spatial_route(q, k, v, 5, mesh=mesh4, spatial_axis="sp", method="ulysses")
    q, k, v = _shapes(1, (16,), 8, 2)
    with pytest.raises(NotImplementedError, match=r"kv heads \(2\) per shard .*not divisible by 4"):
        js.spatial_route(q, k, v, 5, mesh=mesh4, spatial_axis="sp", method="ulysses")
    # Head sharding leaves 4 / 2 heads per shard: kv heads 2 do not split 4 ways.
    q, k, v = _shapes(1, (16,), 8, 4)
    with pytest.raises(NotImplementedError, match=r"kv heads \(2\)"):
        js.spatial_route(q, k, v, 5, mesh=AbstractMesh((2, 4), ("model", "sp")), head_axis="model",
                         spatial_axis="sp", method="ulysses")
    q, k, v = _shapes(1, (30,), 8, 8)
    with pytest.raises(ValueError, match="length 30, which 4 shards cannot split evenly"):
        js.spatial_route(q, k, v, 5, mesh=mesh4, spatial_axis="sp", method="ulysses")
    # auto: no halo fits and Ulysses cannot split 6 heads 4 ways: both reasons.
    q, k, v = _shapes(1, (16,), 6, 6)
    with pytest.raises(ValueError, match=r"smaller than the halo.*method='ulysses'.*heads \(6\)"):
        js.spatial_route(q, k, v, 9, mesh=mesh4, spatial_axis="sp")
    with pytest.raises(ValueError, match="method='fast' is not one of"):
        js.spatial_route(q, k, v, 5, mesh=mesh4, spatial_axis="sp", method="fast")
    assert "ulysses" in js.METHODS


@pytest.mark.slow
def test_bench_sharding_ulysses_cpu_smoke(tmp_path):
    """`python -m benchmarks sharding --method auto,ulysses` runs both routes on 8 virtual CPU
    devices (tiny shapes) and names the route each row took."""
    import json

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "sharding", "--cpu-smoke", "--repeats", "1",
                           "--problems", "2d-flux", "--gpus", "2,4", "--batch", "2",
                           "--method", "auto,ulysses", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "bench_sharding.json").read_text())["rows"]
    spatial = {(r["method"], r["route"], r["devices"]) for r in rows if r["mode"] == "spatial" and r.get("ok")}
    assert spatial == {("auto", "offset", 2), ("auto", "offset", 4), ("ulysses", "ulysses", 2),
                       ("ulysses", "ulysses", 4)}, rows
    assert "ulysses" in (tmp_path / "bench_sharding.md").read_text()
