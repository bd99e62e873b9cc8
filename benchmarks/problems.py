"""Benchmark problems: `jna.problem_sets` (kept here for the benchmark scripts' imports)."""

from jna.problem_sets import PUBLIC_PROBLEMS, REPO, Problem, load, problem_files  # noqa: F401
