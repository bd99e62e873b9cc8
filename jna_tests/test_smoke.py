"""Smoke tier: what an installed jna must do, in about a minute on a CPU.

It runs in the full suite, and on its own against a built wheel installed (not editable) into a
fresh virtual environment, from a directory outside the checkout, once per end of the supported
jax range (``scripts/smoke_wheel.sh``, called by ``.ci/run``). There ``JNA_SMOKE_INSTALLED=1``
additionally checks that the jna under test is the installed one.

Covered: every backend in interpret mode (fused-mosaic in the Mosaic GPU simulator), forward and
gradients against the float64 oracle; the shipped problem sets; a tuned-table lookup (shipped and
user tables); the linen and NNX modules; `jna.explain`.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jna
from jna._src import resources
from jna.tuning import problem_sets
from jna.tuning import tables as tuned
from jna_tests.common import (Config, assert_abs, make_inputs, oracle_bwd,
                              oracle_fwd, run_na)

CASE = Config((7, 9), (3, 4), (1, 2), (2, 1), (False, True), batch=1, heads=2, heads_kv=1,
              dim=8, dim_v=8)


def test_the_installed_package_is_under_test():
    assert (resources.data_root() / "fused_triton.json").is_file()
    if os.environ.get("JNA_SMOKE_INSTALLED") == "1":
        where = pathlib.Path(jna.__file__).resolve()
        assert "site-packages" in where.parts, where  # not a checkout on sys.path
        assert "site-packages" in pathlib.Path(str(resources.data_root())).resolve().parts


@pytest.mark.parametrize("backend", ["reference", "fused-triton", "unfused"])
def test_backend_forward_and_gradients(backend):
    """2-D, dilation, stride, one causal axis, GQA: out, lse and dq/dk/dv vs the oracle."""
    inp = make_inputs(CASE, jnp.float32, seed=1)
    out, lse, grads = run_na(CASE, inp, backend, grads=True)
    want_out, want_lse = oracle_fwd(CASE, inp)
    assert_abs(out, want_out, 1e-4, f"{backend} out", CASE)
    assert_abs(lse, want_lse, 1e-4, f"{backend} lse", CASE)
    for name, got, want in zip(("dq", "dk", "dv"), grads[:3], oracle_bwd(CASE, inp)[:3]):
        assert_abs(got, want, 1e-3, f"{backend} {name}", CASE)


_MOSAIC_SCRIPT = """
import json, jax, jax.numpy as jnp, numpy as np, jna
from jna_tests.common import Config, make_inputs, oracle_bwd, oracle_fwd, run_na
from jna_tests import oracle
cfg = Config((96,), (24,), (2,), (2,), (True,), batch=1, heads=2, heads_kv=1, dim=64, dim_v=64)
inp = make_inputs(cfg, jnp.bfloat16, seed=2)
out, lse, grads = run_na(cfg, inp, "fused-mosaic", grads=True)
want_out, want_lse = oracle_fwd(cfg, inp)
f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)
errors = {"out": oracle.rel_l2(f64(out), want_out), "lse": float(np.abs(f64(lse) - want_lse).max()),
          "dtype": str(out.dtype)}
for name, got, want in zip(("dq", "dk", "dv"), grads[:3], oracle_bwd(cfg, inp)[:3]):
    errors[name] = oracle.rel_l2(f64(got), want)
print(json.dumps(errors))
"""


def test_fused_mosaic_in_the_simulator():
    """fused-mosaic (bf16, D 64, 1-D causal strided dilated GQA) in the Mosaic GPU simulator.

    In a subprocess: the simulator needs ``NPROC >= 4`` host threads before jax starts (see
    `jna_tests/test_fused_mosaic_sim.py`)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", NPROC="8")
    proc = subprocess.run([sys.executable, "-c", _MOSAIC_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600, cwd=pathlib.Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert errors.pop("dtype") == "bfloat16"
    assert errors.pop("lse") <= 2e-2, errors
    assert all(err <= 1e-2 for err in errors.values()), errors


def test_shipped_problem_sets_load():
    names = problem_sets.set_names()
    assert {"public", "models", "paper_sweeps", "tiny"} <= set(names)
    for name in names:
        problems = problem_sets.load(name)
        assert problems and all(p.params.rank == p.rank for p in problems), name
    public = {p.name for p in problem_sets.load("public")}
    assert {"1d-long", "2d-flux", "3d-hunyuan-gna", "2d-dinat"} <= public
    with pytest.raises(ValueError, match="no-such-set"):
        problem_sets.load("no-such-set")


def test_tuned_table_lookup(monkeypatch, tmp_path):
    """The H200 table shipped as package data answers for its problems; a user table (written
    where the tuner writes, never into the package) is read over it."""
    from jna.backends.mosaic import op as fused_mosaic

    monkeypatch.setenv("JNA_TUNED_DIR", str(tmp_path))
    monkeypatch.setattr(tuned, "device_slug", lambda kind=None: "nvidia_h200")
    flux = next(p for p in problem_sets.load("public") if p.name == "2d-flux")
    shipped = tuned.exact("fused-mosaic", flux.params, 128, "bfloat16")
    assert shipped is not None and len(shipped["q_tile"]) == 2
    assert fused_mosaic.default_config(flux.na_problem()) == fused_mosaic.config_from_dict(shipped)
    entry = next(e for e in tuned.entries() if e["backend"] == "fused-mosaic"
                 and e["problem"]["shape"] == [256, 256] and e["problem"]["stride"] == [1, 1])
    mine = dict(entry, config=dict(shipped, q_tile=[8, 16], kv_tile=[8, 16]))
    written = tuned.write_entry(mine, "NVIDIA H200")
    assert written.parent == tmp_path and tuned.shipped_table() is not None
    assert tuned.exact("fused-mosaic", flux.params, 128, "bfloat16")["q_tile"] == [8, 16]
    assert sum(1 for e in tuned.entries() if e["problem"] == entry["problem"]
               and e["backend"] == "fused-mosaic") == 1  # replaced, not added
    monkeypatch.setenv("JNA_TUNED_DIR", "off")
    assert tuned.entries() == () and tuned.exact("fused-mosaic", flux.params, 128, "bfloat16") is None


def test_linen_and_nnx_modules_agree():
    from flax import nnx

    x = jax.random.normal(jax.random.key(0), (2, 6, 7, 16), jnp.float32)
    kwargs = dict(num_heads=2, kernel_size=3, dilation=(1, 2), backend="reference")
    linen = jna.NeighborhoodAttention2D(**kwargs)
    variables = linen.init(jax.random.key(1), x)
    layer = jna.nnx.NeighborhoodAttention2D(in_features=16, **kwargs, rngs=nnx.Rngs(0))
    for name in ("qkv", "proj"):
        getattr(layer, name).kernel[...] = variables["params"][name]["kernel"]
        getattr(layer, name).bias[...] = variables["params"][name]["bias"]
    want = linen.apply(variables, x)
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(want))
    grads = jax.grad(lambda v: linen.apply(v, x).sum())(variables)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_explain_names_the_backend_and_why():
    spec = jax.ShapeDtypeStruct((1, 16, 16, 2, 32), jnp.float32)
    found = jna.explain(spec, spec, spec, kernel_size=5)
    if jax.default_backend() == "cpu":  # there the Pallas kernels would only be emulated
        assert found.backend == "reference"
        assert dict(found.passed_over).keys() == {"fused-mosaic", "fused-triton"}
    else:  # float32: fused-mosaic takes half types only
        assert found.backend == "fused-triton" and "fused-mosaic" in dict(found.passed_over)
    explicit = jna.explain(spec, spec, spec, kernel_size=5, backend="fused-triton")
    assert explicit.backend == "fused-triton" and explicit.config is not None
    assert "fused-triton" in str(explicit)
