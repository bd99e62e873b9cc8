"""Tuning: the autotuner (``python -m jna.tuning``, `tuner`), its per-device tables (`tables`:
shipped as package data, the user's own read over them), the benchmark problem sets
(`problem_sets`) and the timing helpers both use (`timing`)."""
