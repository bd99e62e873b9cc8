"""Multi-device cases of `jna.sharding`, run in a subprocess with 8 virtual CPU devices.

``python -m jna_tests.sharding_cases NAME...`` sets ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
before jax starts (it cannot be changed once jax is initialized, hence the subprocess) and prints
one JSON line per case with its errors against the *unsharded* call; `test_sharding.py` runs it
and asserts. Every case compares forward output, logsumexp and the VJP (random cotangents for
out and lse) wrt q, k, v (and additional keys/values) with the single-device result of the same
backend, and checks the output sharding and the compiled HLO's collectives.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
import traceback

if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


@dataclasses.dataclass(frozen=True)
class Case:
    """One sharded call: a problem, a mesh shape and which mesh axes shard what."""

    shape: tuple
    kernel_size: tuple
    stride: tuple = None
    dilation: tuple = None
    is_causal: tuple = None
    batch: int = 1
    heads: int = 2
    heads_kv: int = 1
    dim: int = 8
    dim_v: int = 8
    n_extra: int = 0
    mesh: tuple = (("sp", 8),)  # (name, size) per mesh axis
    batch_axis: object = None
    head_axis: object = None
    spatial_axis: str = None
    spatial_dim: int = 0
    method: str = "auto"
    backend: str = "reference"
    grads: bool = True
    expect_error: str = None  # "ValueError" / "NotImplementedError": the call must raise it
    expect_route: str = None  # the spatial route the call must take (`jna.sharding.spatial_route`)

    def per_axis(self, value, default):
        return tuple(default for _ in self.shape) if value is None else value


CASES = {
    # 1-D, 8 shards of 8 rows, halo 3 | 3.
    "1d-k7-8shards": Case((64,), (7,), spatial_axis="sp"),
    "1d-k7-8shards-slab": Case((64,), (7,), spatial_axis="sp", method="slab"),
    # The first shard needs more than interior shards on its inner side (windows shift inward);
    # the halo equals the shard size here.
    "1d-k16-border-shift-4shards": Case((32,), (16,), mesh=(("sp", 4),), spatial_axis="sp"),
    "1d-causal-dilated-strided": Case((64,), (5,), (2,), (2,), (True,), mesh=(("sp", 4),),
                                      spatial_axis="sp", heads=4, heads_kv=2, dim_v=12),
    "1d-causal-dilated-strided-slab": Case((64,), (5,), (2,), (2,), (True,), mesh=(("sp", 4),),
                                           spatial_axis="sp", method="slab"),
    "1d-stride-not-aligned": Case((48,), (5,), (5,), mesh=(("sp", 4),), spatial_axis="sp"),
    # Blocked attention with shards a multiple of the block: no halo, no communication.
    "1d-blocked-no-halo": Case((64,), (8,), (8,), mesh=(("sp", 4),), spatial_axis="sp"),
    "1d-extra-kv": Case((32,), (5,), (1,), (3,), mesh=(("sp", 4),), spatial_axis="sp", n_extra=3),
    # 2-D: batch x spatial mesh; head x spatial with GQA, sharding the second axis.
    "2d-batch-x-spatial-dilated": Case((32, 10), (5, 3), (1, 1), (2, 1), (False, False), batch=2,
                                       mesh=(("data", 2), ("sp", 4)), batch_axis="data",
                                       spatial_axis="sp"),
    "2d-head-x-spatial-dim1-causal-strided": Case(
        (6, 32), (3, 6), (1, 3), (1, 1), (False, True), heads=4, heads_kv=2,
        mesh=(("model", 2), ("sp", 4)), head_axis="model", spatial_axis="sp", spatial_dim=1),
    "2d-slab-strided": Case((8, 32), (3, 4), (1, 2), (1, 1), (False, False),
                            mesh=(("sp", 4),), spatial_axis="sp", spatial_dim=1, method="slab"),
    # 3-D, every option on the sharded axis.
    "3d-causal-strided-dilated": Case((32, 5, 6), (3, 3, 2), (2, 1, 2), (2, 1, 1),
                                      (True, False, False), mesh=(("sp", 4),), spatial_axis="sp"),
    "3d-batch-head-spatial": Case((16, 4, 6), (5, 3, 3), (1, 1, 3), (1, 1, 2),
                                  (False, False, True), batch=2, heads=2, heads_kv=2,
                                  mesh=(("data", 2), ("model", 2), ("sp", 2)), batch_axis="data",
                                  head_axis="model", spatial_axis="sp"),
    # Batch and head sharding only: no communication.
    "2d-batch-head-only": Case((9, 10), (3, 4), (1, 2), (2, 1), (False, True), batch=4, heads=4,
                               heads_kv=2, mesh=(("data", 4), ("model", 2)), batch_axis="data",
                               head_axis=("model",)),
    # Errors.
    "1d-shard-smaller-than-halo": Case((32,), (12,), spatial_axis="sp", expect_error="ValueError"),
    "1d-heads-not-divisible": Case((16,), (5,), heads=3, heads_kv=3, mesh=(("model", 2),),
                                   head_axis="model", expect_error="ValueError"),
    "1d-length-not-divisible": Case((30,), (5,), mesh=(("sp", 4),), spatial_axis="sp",
                                    expect_error="ValueError"),
    "1d-slab-inexact-raises": Case((48,), (5,), (5,), mesh=(("sp", 4),), spatial_axis="sp",
                                   method="slab", expect_error="NotImplementedError"),
    # fused-triton (Pallas interpret mode on CPU: tiny problems).
    "fused-triton-batch-head": Case((16,), (5,), batch=2, heads=2, heads_kv=2,
                                    mesh=(("data", 2), ("model", 2)), batch_axis="data",
                                    head_axis="model", backend="fused-triton", grads=False),
    "fused-triton-spatial-slab": Case((32,), (5,), mesh=(("sp", 2),), spatial_axis="sp",
                                      backend="fused-triton", method="slab"),
    # fused-triton's query offsets (issue 17): auto takes them; dilation widens the left halo.
    "fused-triton-offset-1d": Case((32,), (5,), mesh=(("sp", 2),), spatial_axis="sp",
                                   backend="fused-triton"),
    "fused-triton-offset-2d-dilated-strided-causal": Case(
        (16, 12), (3, 5), (1, 2), (2, 1), (True, False), heads=2, heads_kv=1, mesh=(("sp", 2),),
        spatial_axis="sp", backend="fused-triton"),
    "fused-triton-offset-3d-axis1-with-heads": Case(
        (6, 8, 4), (3, 3, 3), (1, 2, 1), (1, 1, 1), (False, True, False), heads=2, heads_kv=2,
        mesh=(("sp", 2), ("model", 2)), spatial_axis="sp", spatial_dim=1, head_axis="model",
        backend="fused-triton"),
    "fused-triton-offset-raises": Case((36,), (3,), dilation=(2,), mesh=(("sp", 4),), spatial_axis="sp",
                                       backend="fused-triton", method="offset",
                                       expect_error="NotImplementedError"),
}


# Ulysses (all-to-all) cases, run by `test_ulysses.py` (same worker, their own checks).
ULYSSES_CASES = {
    # 2-D, GQA (8 q heads, 4 kv heads over 4 shards), dilation, stride and causal on the sharded axis.
    "ulysses-2d-gqa-dilated-strided-causal": Case(
        (16, 6), (5, 3), (2, 1), (2, 1), (True, False), heads=8, heads_kv=4, dim_v=12,
        mesh=(("sp", 4),), spatial_axis="sp", method="ulysses", expect_route="ulysses"),
    # auto: 8 shards of 4 rows cannot hold the 6/5-row halo of K=12, Ulysses needs none.
    "ulysses-1d-auto-halo-too-wide": Case((32,), (12,), heads=8, heads_kv=8, spatial_axis="sp",
                                          expect_route="ulysses"),
    # 3-D on axis 1, batch x spatial mesh, every option on the sharded axis.
    "ulysses-3d-axis1-batch-x-spatial": Case(
        (4, 8, 6), (3, 5, 2), (1, 2, 2), (1, 1, 1), (False, True, False), batch=2, heads=4,
        heads_kv=4, mesh=(("data", 2), ("sp", 4)), batch_axis="data", spatial_axis="sp",
        spatial_dim=1, method="ulysses", expect_route="ulysses"),
    # head x spatial: 8 q / 4 kv heads, 2 head shards, then 2 Ulysses shards of 4 / 2 heads.
    "ulysses-head-x-spatial-gqa": Case(
        (12, 8), (3, 4), (1, 2), (2, 1), (False, False), heads=8, heads_kv=4,
        mesh=(("model", 2), ("sp", 2)), head_axis="model", spatial_axis="sp", method="ulysses",
        expect_route="ulysses"),
    "ulysses-1d-extra-kv": Case((32,), (5,), (1,), (3,), heads=4, heads_kv=4, n_extra=3,
                                mesh=(("sp", 4),), spatial_axis="sp", method="ulysses",
                                expect_route="ulysses"),
    # Blocked attention over 8 shards (the whole grid per shard: no border effects at all).
    "ulysses-1d-blocked-8shards": Case((64,), (8,), (8,), heads=8, heads_kv=8, spatial_axis="sp",
                                       method="ulysses", expect_route="ulysses"),
    # fused-triton (Pallas interpret mode): the backend's ordinary call on the whole grid.
    "ulysses-fused-triton-2d-gqa": Case(
        (8, 8), (3, 5), (1, 2), (2, 1), (False, True), heads=4, heads_kv=2, mesh=(("sp", 2),),
        spatial_axis="sp", method="ulysses", backend="fused-triton", expect_route="ulysses"),
    # Errors: heads / kv heads not divisible by the spatial mesh axis size.
    "ulysses-heads-not-divisible": Case((16,), (5,), heads=6, heads_kv=6, mesh=(("sp", 4),),
                                        spatial_axis="sp", method="ulysses",
                                        expect_error="NotImplementedError"),
    "ulysses-kv-heads-not-divisible": Case((16,), (5,), heads=8, heads_kv=2, mesh=(("sp", 4),),
                                           spatial_axis="sp", method="ulysses",
                                           expect_error="NotImplementedError"),
}


def _collectives(hlo: str) -> dict:
    """Collective ops of a compiled HLO module and the shapes they produce (a tuple-shaped op,
    e.g. the CPU's all-to-all of one operand per device, reports its first element)."""
    found = {}
    for line in hlo.splitlines():
        m = re.search(r"=\s*\(?(\w+\[[^\]]*\](?:\{[^}]*\})?).*?\s(all-gather|collective-permute|all-reduce|all-to-all|"
                      r"reduce-scatter)(-start)?\(", line)
        if m:
            found.setdefault(m.group(2), []).append(m.group(1))
    return found


def run_case(name: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding

    import jna
    import jna.sharding as js

    c = CASES[name] if name in CASES else ULYSSES_CASES[name]
    rank = len(c.shape)
    kw = dict(kernel_size=c.kernel_size, stride=c.per_axis(c.stride, 1),
              dilation=c.per_axis(c.dilation, 1), is_causal=c.per_axis(c.is_causal, False))
    names = tuple(n for n, _ in c.mesh)
    sizes = tuple(s for _, s in c.mesh)
    devices = np.array(jax.devices()[: int(np.prod(sizes))]).reshape(sizes)
    mesh = Mesh(devices, names)
    shard_kw = dict(mesh=mesh, batch_axis=c.batch_axis, head_axis=c.head_axis,
                    spatial_axis=c.spatial_axis, spatial_dim=c.spatial_dim, method=c.method)

    rng = np.random.default_rng(len(name))
    arr = lambda *s: jnp.asarray(rng.standard_normal(s, dtype=np.float32))
    q = arr(c.batch, *c.shape, c.heads, c.dim)
    k = arr(c.batch, *c.shape, c.heads_kv, c.dim)
    v = arr(c.batch, *c.shape, c.heads_kv, c.dim_v)
    ek = ev = None
    if c.n_extra:
        ek, ev = arr(c.batch, c.n_extra, c.heads_kv, c.dim), arr(c.batch, c.n_extra, c.heads_kv, c.dim_v)
    dout = arr(c.batch, *c.shape, c.heads, c.dim_v)
    dlse = arr(c.batch, *c.shape, c.heads)
    result = dict(name=name)

    def sharded(q, k, v, ek, ev):
        return js.neighborhood_attention(q, k, v, **kw, additional_keys=ek, additional_values=ev,
                                         return_lse=True, backend=c.backend, **shard_kw)

    def single(q, k, v, ek, ev):
        return jna.neighborhood_attention(q, k, v, **kw, additional_keys=ek, additional_values=ev,
                                          return_lse=True, backend=c.backend)

    if c.expect_error:
        try:
            jax.jit(sharded)(q, k, v, ek, ev)
        except Exception as e:  # noqa: BLE001 - the type is what we check
            result.update(error=type(e).__name__, message=str(e))
        else:
            result.update(error=None)
        return result

    spec = js.partition_spec(rank, c.batch_axis, c.head_axis, c.spatial_axis, c.spatial_dim)
    lse_spec = js.partition_spec(rank, c.batch_axis, c.head_axis, c.spatial_axis, c.spatial_dim,
                                 trailing=False)
    put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))
    qs, ks, vs = put(q, spec), put(k, spec), put(v, spec)

    def vjp_of(fn):
        def f(q, k, v, ek, ev, dout, dlse):
            (out, lse), pullback = jax.vjp(fn, q, k, v, ek, ev)
            grads = pullback((dout, dlse)) if c.grads else ()
            return out, lse, grads
        return jax.jit(f)

    start = time.perf_counter()
    s_out, s_lse, s_grads = vjp_of(sharded)(qs, ks, vs, ek, ev, put(dout, spec), put(dlse, lse_spec))
    result["seconds_sharded"] = time.perf_counter() - start
    r_out, r_lse, r_grads = vjp_of(single)(q, k, v, ek, ev, dout, dlse)

    def err(got, want):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        e = np.abs(got - want)
        e = np.where(np.isnan(e), np.inf, e)
        return float(e.max()), float(np.abs(want).max())

    result["errors"] = {"out": err(s_out, r_out), "lse": err(s_lse, r_lse)}
    for what, g, w in zip(("dq", "dk", "dv", "d_extra_k", "d_extra_v"), s_grads, r_grads):
        if w is not None:
            result["errors"][what] = err(g, w)
    result["out_spec"] = str(s_out.sharding.spec) if isinstance(s_out.sharding, NamedSharding) else None
    result["lse_spec"] = str(s_lse.sharding.spec) if isinstance(s_lse.sharding, NamedSharding) else None
    result["want_out_spec"], result["want_lse_spec"] = str(spec), str(lse_spec)
    result["sharding_ok"] = bool(
        s_out.sharding.is_equivalent_to(NamedSharding(mesh, spec), s_out.ndim)
        and s_lse.sharding.is_equivalent_to(NamedSharding(mesh, lse_spec), s_lse.ndim))

    # Collectives of the compiled forward and forward+backward programs.
    fwd = jax.jit(lambda q, k, v, ek, ev: sharded(q, k, v, ek, ev))
    result["hlo_fwd"] = _collectives(fwd.lower(qs, ks, vs, ek, ev).compile().as_text())
    if c.grads:
        loss = lambda q, k, v, ek, ev: jnp.sum(sharded(q, k, v, ek, ev)[0] * dout)
        bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        result["hlo_fwd_bwd"] = _collectives(bwd.lower(qs, ks, vs, ek, ev).compile().as_text())
    result["route"] = js.spatial_route(q, k, v, **kw, backend=c.backend, **shard_kw)
    if result["route"] in ("offset", "slab"):
        params = jna.semantics.normalize_params(c.shape, **kw)
        h = js.halo(params, dict(c.mesh)[c.spatial_axis], c.spatial_dim)
        # fused-triton's offset route widens the left halo to a multiple of the dilation
        if c.backend == "fused-triton" and c.method in ("auto", "offset"):
            h = js._offset_halo(params, h)
        result["halo"] = [h.left, h.right, h.shard_size]
        result["full_extent"] = c.shape[c.spatial_dim]
    return result


def run_in_subprocess(names, timeout: int = 600):
    """``(rows by name, the CompletedProcess)``: the cases ``names`` run by ``python -m
    jna_tests.sharding_cases`` in a fresh CPU process (8 virtual devices; the tests' own process
    has already fixed its device count), one JSON row per case parsed from its stdout."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-m", "jna_tests.sharding_cases", *names], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=root)
    rows = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            rows[row["name"]] = row
    return rows, proc


def main(names):
    for name in names:
        try:
            row = run_case(name)
        except Exception:  # noqa: BLE001 - reported to the test, which fails with the trace
            row = dict(name=name, crash=traceback.format_exc()[-3000:])
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(CASES))
