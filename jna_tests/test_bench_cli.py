"""The benchmark CLI (`benchmarks/bench.py`) end to end on CPU: the tiny problem set, the
reference backend against XLA's dense attention (a smoke test of the CLI, not a measurement)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(*args, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "benchmarks", "run", *args, "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # ~19 s; `make test`'s 10-minute budget (the CLI's parsing is checked by the others)
def test_cli_runs_tiny_set_and_writes_results(tmp_path):
    proc = _run("--problems", "tiny", "--backends", "reference", "--budget-s", "0.05", "--plot",
                tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    rows = result["rows"]
    names = {r["problem"] for r in rows}
    assert len(names) == 5 and {r["backend"] for r in rows} == {"xla-dense", "reference"}
    for r in rows:  # every cell measured, with TFLOP/s; NA rows also with a speedup
        for mode in ("fwd", "fwd_bwd"):
            assert r[f"{mode}_ms"] > 0, r
            assert r[f"{mode}_tflops"] > 0, r
            if r["backend"] == "reference":
                dense = next(d for d in rows if d["problem"] == r["problem"] and d["backend"] == "xla-dense")
                assert r[f"{mode}_speedup"] == pytest.approx(dense[f"{mode}_ms"] / r[f"{mode}_ms"], rel=0.02)
    meta = result["meta"]
    assert meta["jax"] and meta["commit"] and meta["device"].startswith("cpu")
    md = (tmp_path / "bench.md").read_text()
    assert "| tiny-2d-k5 | bfloat16 | reference |" in md
    assert "[1/" in proc.stderr and "left" in proc.stderr  # progress display
    plots = result["plots"]
    pytest.importorskip("matplotlib")
    assert sorted(pathlib.Path(p).name for p in plots) == ["sweep_1d_bfloat16.png", "sweep_2d_bfloat16.png"]
    for p in plots:
        assert pathlib.Path(p).stat().st_size > 10_000


def test_cells_that_do_not_fit_are_reported_not_run():
    sys.path.insert(0, str(REPO))
    from benchmarks import harness, problems

    problem = problems.load("tiny")[0]
    args = problem.inputs()
    cell = harness.measure(problem, "reference", "fwd", args, budget_s=0.05, memory_limit=1024)
    assert "ms" not in cell and cell["skipped"].startswith("does not fit: needs"), cell
    cell = harness.measure(problem, "reference", "fwd", args, budget_s=0.05, memory_limit=2**40)
    assert cell["ms"] > 0, cell


def test_unknown_problem_set_is_a_clear_error(tmp_path):
    proc = _run("--problems", "no-such-set", tmp_path=tmp_path)
    assert proc.returncode != 0 and "no problem set 'no-such-set'" in proc.stderr


def test_memory_floor_counts_each_tensor_once():
    """The floor printed beside each time: q, k, v, out and lse once forward; the backward adds
    q, k, v, out, dO, lse read and dq, dk, dv written (counted here from the arrays' sizes)."""
    import jax.numpy as jnp

    from jna.tuning import problem_sets

    p = next(x for x in problem_sets.load("public") if x.name == "2d-nat")
    q, k, v, dout = p.inputs(jnp.bfloat16)
    lse = jnp.zeros(q.shape[:-1], jnp.float32)
    tensor = q.nbytes  # every [B, *X, H, D] tensor here has q's size
    assert p.memory_bytes("fwd") == 4 * tensor + lse.nbytes
    assert p.memory_bytes("fwd_bwd") == 4 * tensor + lse.nbytes + 5 * tensor + lse.nbytes + 3 * tensor
    assert p.memory_bytes("jvp") == 8 * tensor + 2 * lse.nbytes
    assert p.floor_ms("fwd", bandwidth=4.2e12) == pytest.approx(0.0124, rel=0.01)  # issue 16's ~0.013
    with pytest.raises(ValueError, match="mode 'bwd'"):
        p.memory_bytes("bwd")


@pytest.mark.slow
def test_rpb_bench_smoke(tmp_path):
    """``python -m benchmarks rpb`` on a tiny problem (interpret mode): every variant timed or
    skipped with its reason, the derived columns filled, the variants agreeing."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "rpb", "--names", "tiny-2d-k3", "--repeats", "1",
                           "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["variant"]: r for r in json.loads((tmp_path / "rpb_bench.json").read_text())["rows"]}
    assert set(rows) == {"fused-triton", "fused-triton+rpb", "fused-mosaic", "fused-mosaic+rpb", "unfused+rpb"}
    for name in ("fused-triton", "fused-triton+rpb", "unfused+rpb"):
        assert rows[name]["fwd_ms"] > 0 and rows[name]["fwd_bwd_ms"] > 0 and rows[name]["fwd_bwd_peak_bytes"] > 0
    assert rows["fused-mosaic"].get("skipped")  # the simulator is not timed
    assert rows["fused-triton+rpb"]["rpb_overhead_fwd"] > 0 and rows["fused-triton+rpb"]["speedup_vs_unfused_fwd"] > 0
    assert max(rows["unfused+rpb"]["rel_l2_vs_baseline"].values()) < 2e-2
    assert "| tiny-2d-k3 | fused-triton+rpb |" in (tmp_path / "rpb_bench.md").read_text()
