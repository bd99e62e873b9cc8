"""The oracle sweep's problems, per backend: random problems and fixed edge cases.

Like NATTEN's own tests: ranks 1/2/3, extents 4..48 on 1-D (smaller per axis for 2-D/3-D so
N stays under the backend's ``max_tokens``), K in [2, L] (even and odd alternate), s in [1, K],
d in [1, L // K], random per-axis causal, GQA, D_v != D, sometimes additional keys/values and
an explicit scale; plus fixed edge cases (K = L, s = K, K = 2, maximal dilation, all causal).
Case counts per backend come from `jna_tests.backends`.
"""

import dataclasses

import numpy as np
import jax.numpy as jnp
import pytest

from jna_tests.backends import BACKENDS
from jna_tests.common import Config

MAX_EXTENT = {1: 48, 2: 24, 3: 10}
FAST_CASES = 2  # float32 random cases per rank and backend in the fast tier


def random_config(rank: int, index: int, caps) -> Config:
    """A random valid problem; deterministic in (rank, index)."""
    rng = np.random.default_rng(1000 * rank + index)
    while True:
        shape = tuple(int(rng.integers(4, MAX_EXTENT[rank] + 1)) for _ in range(rank))
        if np.prod(shape) <= caps.max_tokens:
            break
    ks = []
    for axis, L in enumerate(shape):  # K parity alternates with the case index and axis
        parity = (index + axis) % 2
        ks.append(int(rng.choice([k for k in range(2, L + 1) if k % 2 == parity])))
    dl = tuple(int(rng.integers(1, L // k + 1)) for L, k in zip(shape, ks))
    st = tuple(int(rng.integers(1, k + 1)) for k in ks)
    ca = tuple(bool(rng.random() < 0.4) for _ in shape)
    heads_kv = int(rng.integers(1, 3))
    heads = heads_kv * int(rng.integers(1, 4))
    dim = int(rng.choice(caps.head_dims))
    dim_v = dim if caps.same_value_dim or rng.random() < 0.4 else int(rng.choice(caps.head_dims))
    n_extra = int(rng.integers(1, 9)) if caps.additional_kv and rng.random() < 0.3 else 0
    scale = float(rng.uniform(0.1, 1.0)) if rng.random() < 0.25 else None
    return Config(shape, tuple(ks), st, dl, ca, batch=int(rng.integers(1, 3)), heads=heads,
                  heads_kv=heads_kv, dim=dim, dim_v=dim_v, n_extra=n_extra, scale=scale)


def edge_configs(caps) -> list:
    """Fixed corner cases, each of which a plausible kernel bug would break."""
    n = 3 if caps.additional_kv else 0
    c = [
        Config((16,), (16,), (1,), (1,), (False,)),                         # K = L: full attention
        Config((17,), (17,), (5,), (1,), (True,), heads=2, heads_kv=2),     # K = L causal, strided
        Config((24,), (4,), (4,), (1,), (False,), n_extra=n),               # blocked, L % K == 0
        Config((23,), (4,), (4,), (1,), (True,)),                           # blocked causal, ragged
        Config((20,), (2,), (1,), (10,), (False,), dim=4, dim_v=12),        # K = 2, d = L // K
        Config((9, 11), (9, 2), (1, 2), (1, 5), (False, True), heads=4, heads_kv=1),
        Config((12, 8), (12, 8), (12, 8), (1, 1), (True, True), heads=3, heads_kv=3, n_extra=n),
        Config((6, 7, 5), (3, 7, 2), (3, 1, 2), (2, 1, 2), (True, False, True), heads=2),
        Config((8, 8, 8), (2, 2, 2), (1, 2, 1), (4, 4, 1), (False, False, False), batch=2),
    ]
    return [cfg for cfg in c if cfg.num_tokens <= caps.max_tokens]


def _edge_case_dtype_and_config(caps, cfg):
    """Edge cases run in float32 with small dims, or, for a backend without float32 or those
    dims, in its first dtype at its first head dim."""
    dtype = jnp.float32 if jnp.float32 in caps.dtypes else caps.dtypes[0]
    if cfg.dim not in caps.head_dims or cfg.dim_v not in caps.head_dims or (
            caps.same_value_dim and cfg.dim != cfg.dim_v):
        cfg = dataclasses.replace(cfg, dim=caps.head_dims[0], dim_v=caps.head_dims[0])
    return dtype, cfg


def sweep_cases(backend: str):
    """``pytest.param(dtype, cfg, seed)`` of one backend's sweep (ids name dtype, rank, case)."""
    caps = BACKENDS[backend]
    if True:
        for rank in (1, 2, 3):
            for i in range(caps.cases[rank - 1] if jnp.float32 in caps.dtypes else 0):
                # The first FAST_CASES per rank run in `make test` (with the edge cases they cover
                # every feature axis); the rest of the sweep in `make test-full`.
                yield pytest.param(jnp.float32, random_config(rank, i, caps), i,
                                   id=f"f32-{rank}d-{i}",
                                   marks=() if i < FAST_CASES else pytest.mark.slow)
            for dtype in caps.dtypes:
                if dtype == jnp.float32:
                    continue
                name = jnp.dtype(dtype).name
                for i in range(caps.lowp_cases[rank - 1]):
                    j = 100 + i  # different problems from the float32 ones
                    yield pytest.param(dtype, random_config(rank, j, caps), j,
                                       id=f"{name}-{rank}d-{j}")
        for i, cfg in enumerate(edge_configs(caps)):
            dtype, cfg = _edge_case_dtype_and_config(caps, cfg)
            name = "f32" if dtype == jnp.float32 else jnp.dtype(dtype).name
            yield pytest.param(dtype, cfg, 500 + i, id=f"{name}-edge-{i}")
