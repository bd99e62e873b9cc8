"""Benchmark problems: `jna.tuning.problem_sets` (kept here for the benchmark scripts' imports)."""

from jna.tuning.problem_sets import Problem, load, set_names  # noqa: F401
