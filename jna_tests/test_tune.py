"""Tuned tile tables (`jna.tuning.tables`) steer the fused backends' config choice; the autotuner
(`python -m jna.tuning`) writes them. On CPU the tuner times interpret-mode kernels (meaningless
numbers, so it needs ``--allow-emulated``): these tests check the mechanics, not speed."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import pytest

from jna.tuning import problem_sets
from jna.tuning import tuner as tune
from jna.tuning import tables as tuned
from jna.backends.mosaic import op as fused_mosaic
from jna.backends.triton import fused as fused_triton
from jna.backends.triton import unfused as unfused

REPO = pathlib.Path(__file__).resolve().parents[1]
PROBLEM = problem_sets.Problem("p", 1, 2, 16, (16, 16), (5, 5), (1, 1), (1, 1), (False, False))
OTHER = problem_sets.Problem("q", 1, 2, 16, (24, 20), (7, 3), (1, 1), (1, 1), (False, True))


@pytest.fixture
def table_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("JNA_TUNED_DIR", str(tmp_path))
    return tmp_path


def _entry(problem, config: dict, class_speeds, dtype="float32", backend="fused-triton"):
    return {"backend": backend, "rank": problem.rank, "head_dim": problem.head_dim, "dtype": dtype,
            "problem": dict(tuned.problem_signature(problem.params), batch=1, heads=2, name=problem.name),
            "objective": "fwd", "config": config, "ms": 1.0, "default_ms": 1.0, "efficiency": 0.5,
            "class_speeds": class_speeds}


def _class(**kw):
    return next(c for c in fused_triton.launch_classes()
                if all(c.fields[k] == v for k, v in kw.items()))


def test_without_a_table_the_shipped_calibration_decides(table_dir):
    na = PROBLEM.na_problem(jnp.float32)
    assert fused_triton.default_config(na) == fused_triton._choose(na.params, 16)


def test_exact_entry_gives_its_config_to_that_problem_only(table_dir):
    config = {"q_tile": [4, 16], "kv_tile": [2, 16], "num_warps": 2, "num_stages": 3,
              "bwd_num_warps": 2, "bwd_num_stages": 1, "direct_layout": False}
    shipped = fused_triton._choose(PROBLEM.params, 16)
    assert (shipped.q_tile, shipped.num_warps) != ((4, 16), 2)  # the entry changes the choice
    tuned.write_entry(_entry(PROBLEM, config, []), "cpu")
    got = fused_triton.default_config(PROBLEM.na_problem(jnp.float32))
    assert got == fused_triton.config_from_dict(config)
    # another dtype or another problem of the same key: not this entry
    assert fused_triton.default_config(PROBLEM.na_problem(jnp.bfloat16)) == shipped
    assert fused_triton.default_config(OTHER.na_problem(jnp.float32)) == fused_triton._choose(OTHER.params, 16)


def test_tuned_class_speeds_steer_other_problems_of_the_key(table_dir):
    shipped = fused_triton._choose(OTHER.params, 16)
    slow = _class(max_head_dim=64, q_tokens=32, kv_tokens=32)  # the shipped choice never takes it
    assert math.prod(shipped.q_tile) != 32
    fast_fields = slow.fields
    other_fields = _class(max_head_dim=64, q_tokens=128, kv_tokens=128).fields
    speeds = [{"class": fast_fields, "speed": 500.0}, {"class": other_fields, "speed": 5.0}]
    tuned.write_entry(_entry(PROBLEM, {"q_tile": [8, 16], "kv_tile": [8, 16]}, speeds), "cpu")
    assert dict(tuned.class_speeds("fused-triton", 2, 16, "float32")) == {
        tuned.class_key(fast_fields): 1.0, tuned.class_key(other_fields): 0.01}
    got = fused_triton.default_config(OTHER.na_problem(jnp.float32))
    assert math.prod(got.q_tile) == 32 and math.prod(got.kv_tile) == 32, got
    assert (got.num_warps, got.num_stages) == (slow.param("num_warps"), slow.param("num_stages"))
    # another dtype: untouched
    assert fused_triton.default_config(OTHER.na_problem(jnp.bfloat16)) == shipped


def test_mosaic_reads_exact_entries(table_dir):
    config = {"q_tile": [8, 8], "kv_tile": [4, 16], "num_stages": 3}
    problem = problem_sets.Problem("m", 1, 2, 64, (32, 32), (9, 9), (1, 1), (1, 1), (False, False))
    tuned.write_entry(_entry(problem, config, [], dtype="bfloat16", backend="fused-mosaic"), "cpu")
    got = fused_mosaic.default_config(problem.na_problem(jnp.bfloat16))
    assert got == fused_mosaic.MosaicConfig((8, 8), (4, 16), 3)


def _tune(*args, table_dir):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JNA_TUNED_DIR=str(table_dir))
    return subprocess.run([sys.executable, "-m", "jna.tuning", "--backend", "fused-triton", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_tuner_writes_its_best_measured_candidate(tmp_path):
    args = ["--shape", "16,16", "--kernel-size", "5", "--heads", "2", "--head-dim", "16",
            "--dtype", "float32", "--max-candidates", "2", "--budget-s", "0.02"]
    refused = _tune(*args, table_dir=tmp_path)
    assert refused.returncode == 2 and "meaningless" in refused.stderr
    proc = _tune(*args, "--allow-emulated", table_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[2/2]" in proc.stderr  # progress display
    table = json.loads((tmp_path / "cpu.json").read_text())
    (entry,) = table["entries"]
    cands = [c.config for c in tune.candidates("fused-triton", PROBLEM, 2)][:2]
    default = fused_triton._choose(PROBLEM.params, 16)  # kept when it measured fastest
    assert fused_triton.config_from_dict(entry["config"]) in cands + [default]
    assert entry["ms"] <= entry["default_ms"]
    assert entry["candidates"] == 2 and entry["ms"] > 0 and entry["default_ms"] > 0
    assert entry["problem"]["shape"] == [16, 16] and entry["dtype"] == "float32"
    # a fresh process reads it back for that problem
    check = subprocess.run(
        [sys.executable, "-c",
         "import jax.numpy as jnp; from jna.tuning import problem_sets; from jna.backends.triton import fused as f;"
         "p = problem_sets.Problem('p', 1, 2, 16, (16, 16), (5, 5), (1, 1), (1, 1), (False, False));"
         "print(f.default_config(p.na_problem(jnp.float32)))"],
        cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu", JNA_TUNED_DIR=str(tmp_path)),
        capture_output=True, text=True, timeout=300)
    assert repr(fused_triton.config_from_dict(entry["config"])) in check.stdout, check.stderr[-2000:]


def test_explicit_config_wins_over_tuned_entries(table_dir):
    tuned.write_entry(_entry(PROBLEM, {"q_tile": [4, 16], "kv_tile": [2, 16]}, []), "cpu")
    na = PROBLEM.na_problem(jnp.float32)
    assert fused_triton.FusedTriton().config_for(na).q_tile == (4, 16)  # the tuned entry
    explicit = fused_triton.FusedTriton(fused_triton.TritonConfig((16, 8), (16, 8), num_warps=8))
    got = explicit.config_for(na)
    assert (got.q_tile, got.kv_tile, got.num_warps) == ((16, 8), (16, 8), 8)
    assert explicit.config_source(na).startswith("explicit")
    problem = problem_sets.Problem("m", 1, 2, 64, (32, 32), (9, 9), (1, 1), (1, 1), (False, False))
    tuned.write_entry(_entry(problem, {"q_tile": [8, 8], "kv_tile": [4, 16], "num_stages": 3}, [],
                             dtype="bfloat16", backend="fused-mosaic"), "cpu")
    got = fused_mosaic.FusedMosaic(fused_mosaic.MosaicConfig((4, 32), (2, 64), 2)).config_for(
        problem.na_problem(jnp.bfloat16))
    assert got == fused_mosaic.MosaicConfig((4, 32), (2, 32), 2)  # kv fitted to the 32-wide map


def test_unfused_reads_its_own_entries_not_fused_triton_ones(table_dir):
    shipped = fused_triton._choose(PROBLEM.params, 16)
    triton_config = {"q_tile": [4, 16], "kv_tile": [2, 16], "num_warps": 2, "num_stages": 3}
    tuned.write_entry(_entry(PROBLEM, triton_config, []), "cpu")
    na = PROBLEM.na_problem(jnp.float32)
    assert unfused.default_config(na) == shipped  # fused-triton's entry tunes fused-triton only
    config = {"q_tile": [4, 4], "kv_tile": [4, 8], "num_warps": 4, "num_stages": 2,
              "bwd_num_warps": 4, "bwd_num_stages": 1, "direct_layout": True}
    tuned.write_entry(_entry(PROBLEM, config, [], backend="unfused"), "cpu")
    assert unfused.default_config(na) == fused_triton.config_from_dict(config)
    assert unfused.default_config(OTHER.na_problem(jnp.float32)) == fused_triton._choose(OTHER.params, 16)


def test_unfused_candidates_run_and_the_best_is_stored(table_dir):
    cands = tune.candidates("unfused", PROBLEM, 1)
    assert {math.prod(c.config.q_tile) for c in cands} >= {16, 32, 64}
    entry = tune.tune_problem("unfused", PROBLEM, jnp.float32, "fwd", 1, 2, 0.01)
    assert entry["backend"] == "unfused" and entry["candidates"] == 2
    default = unfused.default_config(PROBLEM.na_problem(jnp.float32))  # kept when it measured fastest
    assert fused_triton.config_from_dict(entry["config"]) in [c.config for c in cands[:2]] + [default]
    tuned.write_entry(entry, "cpu")
    assert unfused.default_config(PROBLEM.na_problem(jnp.float32)) == fused_triton.config_from_dict(entry["config"])


def test_a_candidate_computing_something_else_is_rejected_not_timed(table_dir, monkeypatch):
    cands = tune.candidates("unfused", PROBLEM, 1)[:2]
    real = unfused.attention

    def broken_first(q, k, v, problem, config=None, rpb=None):
        out, lse = real(q, k, v, problem, config, rpb)
        return (out * 2 if config == cands[0].config else out), lse

    monkeypatch.setattr(unfused, "attention", broken_first)
    entry = tune.tune_problem("unfused", PROBLEM, jnp.float32, "fwd", 1, 2, 0.01)
    assert entry["candidates"] == 1
    default = unfused.default_config(PROBLEM.na_problem(jnp.float32))  # kept when it measured fastest
    assert fused_triton.config_from_dict(entry["config"]) in (cands[1].config, default)
    assert fused_triton.config_from_dict(entry["config"]) != cands[0].config or cands[0].config == default


def test_mosaic_candidates_add_persistent_and_direct_layout_variants():
    divisible = problem_sets.Problem("d", 1, 2, 64, (64, 64), (13, 13), (1, 1), (1, 1), (False, False))
    cands = tune.candidates("fused-mosaic", divisible, 1)
    from jna.backends import launch

    classes = len(launch.for_head_dim(fused_mosaic.launch_classes(), 64))
    variants = {(c.config.direct_layout, c.config.persistent) for c in cands}
    assert variants == {(False, False), (False, True), (True, False), (True, True)}
    assert len(cands) == 4 * classes
    assert all(c.class_fields.get("direct_layout", False) == c.config.direct_layout for c in cands)
    odd = problem_sets.Problem("o", 1, 2, 64, (60, 60), (13, 13), (1, 1), (1, 1), (False, False))
    odd_cands = tune.candidates("fused-mosaic", odd, 1)
    assert not any(c.config.direct_layout for c in odd_cands) and len(odd_cands) == 2 * classes


def test_user_tables_go_to_the_user_cache_never_into_the_package(tmp_path, monkeypatch):
    """The tuner's default table is under ``$JNA_CACHE_DIR/tuned`` (else ``~/.cache/jna``), so a
    read-only site-packages does not stop tuning; ``JNA_TUNED_DIR`` overrides the folder."""
    from jna._src import resources

    monkeypatch.delenv("JNA_TUNED_DIR", raising=False)
    monkeypatch.setenv("JNA_CACHE_DIR", str(tmp_path / "cache"))
    path = tuned.write_entry(_entry(PROBLEM, {"q_tile": [8, 8], "kv_tile": [8, 8]}, []), "NVIDIA H200")
    assert path == tmp_path / "cache" / "tuned" / "nvidia_h200.json" and path.is_file()
    assert pathlib.Path(str(resources.data_root())) not in path.parents
    monkeypatch.delenv("JNA_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert tuned.table_path("NVIDIA H200") == tmp_path / "home" / ".cache" / "jna" / "tuned" / "nvidia_h200.json"
    monkeypatch.setenv("JNA_TUNED_DIR", str(tmp_path / "mine"))
    assert tuned.table_path("cpu") == tmp_path / "mine" / "cpu.json"


@pytest.mark.parametrize("name", ["fused-triton", "fused-mosaic"])
def test_launch_classes_round_trip_their_config_file(name):
    """One `LaunchClass` type for both fused backends: the shipped JSON reads and writes back
    unchanged, and the tables' key is the sorted JSON of the class without its speeds."""
    from jna import backends
    from jna._src import resources
    from jna.backends import launch

    backend = backends.get(name)
    raw = resources.read_json(backend.launch_config_file)["classes"]
    classes = backend.launch_classes()
    assert [c.to_json() for c in classes] == [json.loads(json.dumps(e)) for e in raw]
    for c, entry in zip(classes, raw):
        fields = {k: v for k, v in entry.items() if k not in ("speed", "fwd_bwd_speed")}
        assert c.fields == fields and c.key == tuned.class_key(fields)
    assert launch.LaunchClass.from_json(classes[0].to_json()) == classes[0]


def test_launch_classes_bucket_by_head_dim():
    from jna.backends import launch

    classes = fused_triton.launch_classes()
    buckets = sorted({c.max_head_dim for c in classes})
    for dim in (1, buckets[0], buckets[0] + 1, buckets[-1]):
        got = launch.for_head_dim(classes, dim)
        bucket = min(b for b in buckets if dim <= b)
        assert got and all(c.max_head_dim == bucket for c in got)
        assert len(got) == sum(c.max_head_dim == bucket for c in classes)
    assert launch.for_head_dim(classes, buckets[-1] + 1) == []
    mosaic = fused_mosaic.launch_classes()
    assert [c.q_tokens for c in launch.for_head_dim(mosaic, 256)] == [64]  # 64-token tiles only
    assert len(launch.for_head_dim(mosaic, 128)) == len(mosaic) - 1
    assert launch.for_head_dim(mosaic, 512) == []
    no_bounds = [dataclasses.replace(c, max_head_dim=None) for c in classes]
    assert launch.for_head_dim(no_bounds, 4096) == no_bounds  # no bounds: every class


@pytest.mark.parametrize("name", ["fused-triton", "fused-mosaic"])
def test_calibration_finds_a_full_efficiency_config_per_class(name):
    """`python -m benchmarks calibrate` times each class at its plain config on the blocked
    problem, where every class tiles the windows exactly."""
    from benchmarks import calibrate
    from jna import backends

    backend = backends.get(name)
    classes = backend.launch_classes()
    for c in classes:
        (problem,) = calibrate.calibration_problems("blocked", c, classes)
        config, eff = calibrate.class_config(backend, c, problem)
        assert eff == 1.0 and math.prod(config.q_tile) == c.q_tokens, (c, config)
        assert math.prod(config.kv_tile) == c.kv_tokens
        assert not getattr(config, "persistent", False)


def test_auto_takes_fused_triton_where_the_tuner_measured_it_faster(table_dir):
    """`fused_mosaic.auto_declines` compares both backends' tuned entries of the exact problem
    (same objective, batch and heads); without both, or with fused-mosaic faster, it keeps it."""
    problem = dataclasses.replace(PROBLEM, head_dim=64)
    na = problem.na_problem(jnp.bfloat16)
    mosaic = dict(_entry(problem, {"q_tile": [8, 8], "kv_tile": [8, 8], "num_stages": 2}, [],
                         dtype="bfloat16", backend="fused-mosaic"), ms=2.0)
    tuned.write_entry(mosaic, "cpu")
    assert fused_mosaic.auto_declines(na) is None  # only one backend measured
    triton = dict(_entry(problem, {"q_tile": [8, 8], "kv_tile": [8, 8]}, [], dtype="bfloat16"), ms=1.5)
    tuned.write_entry(dict(triton, objective="fwd_bwd"), "cpu")
    assert fused_mosaic.auto_declines(na) is None  # measured for another objective
    tuned.write_entry(triton, "cpu")
    assert "fused-triton measured faster" in fused_mosaic.auto_declines(na)
    assert fused_mosaic.auto_declines(dataclasses.replace(OTHER, head_dim=64).na_problem(jnp.bfloat16)) is None
    tuned.write_entry(dict(mosaic, ms=1.0), "cpu")
    assert fused_mosaic.auto_declines(na) is None


def test_tuner_keeps_the_default_when_no_candidate_beats_it(monkeypatch):
    """Candidates (cut by ``max_candidates``) slower than the default config: the entry keeps
    the default, with its time."""
    times = iter([2.0, 3.0, 1.0])  # candidate 1, candidate 2, then the default
    monkeypatch.setattr(tune, "budgeted_median_ms", lambda *a, **k: next(times))
    entry = tune.tune_problem("fused-triton", PROBLEM, jnp.float32, "fwd", 2, 2, 0.01)
    default = fused_triton.default_config(PROBLEM.na_problem(jnp.float32))
    assert fused_triton.config_from_dict(entry["config"]) == default
    assert entry["ms"] == entry["default_ms"] == 1.0
