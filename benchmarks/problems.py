"""Benchmark problems: loading problem sets, making inputs, counting FLOPs."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import jax
import jax.numpy as jnp

REPO = pathlib.Path(__file__).resolve().parents[1]
PUBLIC_PROBLEMS = REPO / "configs" / "problems" / "public.json"


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

    @property
    def tokens(self) -> int:
        return math.prod(self.shape)

    @property
    def forward_flops(self) -> float:
        """``4 * B * H * N * prod(K) * D`` (problems.json's effective FLOPs)."""
        return 4.0 * self.batch * self.heads * self.tokens * math.prod(self.kernel_size) * self.head_dim

    @property
    def na_kwargs(self) -> dict:
        return dict(kernel_size=self.kernel_size, stride=self.stride, dilation=self.dilation,
                    is_causal=self.is_causal)

    def inputs(self, dtype=jnp.bfloat16, seed: int = 0):
        """Random (never zero) q, k, v ``[B, *X, H, D]`` and an output cotangent."""
        shape = (self.batch, *self.shape, self.heads, self.head_dim)
        keys = jax.random.split(jax.random.key(seed), 4)
        return tuple(jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys)


def load(path: pathlib.Path = PUBLIC_PROBLEMS) -> list[Problem]:
    raw = json.loads(pathlib.Path(path).read_text())["problems"]
    return [
        Problem(p["name"], p["batch"], p["heads"], p["head_dim"], tuple(p["shape"]),
                tuple(p["kernel_size"]), tuple(p["stride"]), tuple(p["dilation"]), tuple(p["is_causal"]))
        for p in raw
    ]
