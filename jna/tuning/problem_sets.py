"""Benchmark problem sets (``configs/problems/*.json``, shipped as package data): loading,
inputs, FLOP counts.

Shared by the benchmarks (`benchmarks/`) and the autotuner (`python -m jna.tuning`). A set is named
by its file stem (``"public"``, ``"models"``, ``"paper_sweeps"``, ``"tiny"``: `set_names`) or
given as the path of a JSON file of the same format.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib

import jax
import jax.numpy as jnp

from jna._src import resources


@dataclasses.dataclass(frozen=True)
class Problem:
    name: str
    batch: int
    heads: int
    head_dim: int
    shape: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]
    sweep: str | None = None  # problems of one sweep (e.g. over kernel size) plot as one curve

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def tokens(self) -> int:
        return math.prod(self.shape)

    @property
    def forward_flops(self) -> float:
        """``4 * B * H * N * prod(K) * D`` (problems.json's effective FLOPs)."""
        return 4.0 * self.batch * self.heads * self.tokens * math.prod(self.kernel_size) * self.head_dim

    def memory_bytes(self, mode: str, dtype=jnp.bfloat16) -> int:
        """The bytes a call must move at least (each tensor read or written once).

        Per (token, head), with ``s`` the dtype's size: the forward reads q, k, v and writes out
        (``4 D s``) and the float32 lse (4); the backward reads q, k, v, out, dO (``5 D s``) and
        lse (4) and writes dq, dk, dv (``3 D s``); a JVP reads q, k, v and their tangents
        (``6 D s``) and writes out and its tangent (``2 D s``) and lse and its tangent (8).
        ``mode``: ``"fwd"``, ``"fwd_bwd"`` (both) or ``"jvp"``.
        """
        size = jnp.dtype(dtype).itemsize
        per_token_head = 4 * self.head_dim * size + 4
        if mode == "fwd_bwd":
            per_token_head += 8 * self.head_dim * size + 4
        elif mode == "jvp":
            per_token_head = 8 * self.head_dim * size + 8
        elif mode != "fwd":
            raise ValueError(f"mode {mode!r}: 'fwd', 'fwd_bwd' or 'jvp'")
        return self.batch * self.tokens * self.heads * per_token_head

    def floor_ms(self, mode: str, dtype=jnp.bfloat16, bandwidth: float | None = None) -> float | None:
        """`memory_bytes` at ``bandwidth`` bytes/s (default: this device's, `memory_bandwidth`):
        the memory floor of a call, in ms; None on a device without a known bandwidth."""
        bandwidth = bandwidth or memory_bandwidth()
        return None if not bandwidth else self.memory_bytes(mode, dtype) / bandwidth * 1e3

    @property
    def na_kwargs(self) -> dict:
        return dict(kernel_size=self.kernel_size, stride=self.stride, dilation=self.dilation,
                    is_causal=self.is_causal)

    @property
    def params(self):
        """The validated window parameters (`jna.semantics.NAParams`)."""
        from jna import semantics
        return semantics.normalize_params(self.shape, self.kernel_size, self.stride, self.dilation,
                                          self.is_causal)

    def na_problem(self, dtype=jnp.bfloat16):
        """The `jna._src.arguments.NAProblem` of a call on `inputs` (what backends choose configs for)."""
        from jna._src.arguments import NAProblem
        return NAProblem(self.params, self.batch, self.heads, self.heads, self.head_dim, self.head_dim,
                         jnp.dtype(dtype), self.head_dim ** -0.5, 0)

    def inputs(self, dtype=jnp.bfloat16, seed: int = 0):
        """Random (never zero) q, k, v ``[B, *X, H, D]`` and an output cotangent."""
        shape = (self.batch, *self.shape, self.heads, self.head_dim)
        keys = jax.random.split(jax.random.key(seed), 4)
        return tuple(jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys)


# Attainable HBM bandwidth (bytes/s) per device kind, for the memory floor: an H200's device-to-
# device copy measured ~4.3 TB/s here (HBM3e peak 4.8), an H100 SXM's ~3.0 (peak 3.35).
_BANDWIDTH = {"NVIDIA H200": 4.2e12, "NVIDIA H100 80GB HBM3": 3.0e12}


def memory_bandwidth() -> float | None:
    """This default device's attainable memory bandwidth in bytes/s, or None if unknown."""
    return _BANDWIDTH.get(jax.devices()[0].device_kind)


def _per_axis(value, rank: int) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * rank


def set_names() -> list[str]:
    """The names of the problem sets shipped with jna."""
    return [f.name[: -len(".json")] for f in resources.list_json("problems")]


def load(source: str | os.PathLike = "public") -> list[Problem]:
    """The problems of a problem set: a shipped set's name (`set_names`) or a JSON file's path.

    The file holds ``{"problems": [...]}``; stride, dilation and is_causal may be omitted
    (1, 1, false) or given as one value for every axis.
    """
    if isinstance(source, str) and source in set_names():
        text = resources.data_file("problems", f"{source}.json").read_text(encoding="utf-8")
    elif pathlib.Path(source).is_file():
        text = pathlib.Path(source).read_text(encoding="utf-8")
    else:
        raise ValueError(f"problem set {str(source)!r} is neither a shipped set "
                         f"({', '.join(set_names())}) nor a JSON file")
    raw = json.loads(text)["problems"]
    problems = []
    for p in raw:
        rank = len(p["shape"])
        problems.append(Problem(
            p["name"], p["batch"], p["heads"], p["head_dim"], tuple(p["shape"]),
            _per_axis(p["kernel_size"], rank), _per_axis(p.get("stride", 1), rank),
            _per_axis(p.get("dilation", 1), rank), _per_axis(p.get("is_causal", False), rank),
            p.get("sweep")))
    return problems
