"""Probe: do small float32 matmuls on this device agree with float64 numpy, per precision?

    python -m benchmarks matmul-probe

Written for jax 0.12.0.1 on an H200, where `jna.merge_attentions` fed by float32 einsums with
``precision="highest"`` (the additional-keys path of `jna.neighborhood_attention`, and
`jna_tests/test_x64.py::test_merge_attentions`) disagreed with the float64 oracle while jax 0.11.2
on the same machine agreed. Prints one line per (shape, precision, jit): the max abs error of
the einsum against numpy, and the dot's lowering after XLA's optimizations (custom call, algorithm).
"""

from __future__ import annotations

import re
import sys

import jax
import jax.numpy as jnp
import numpy as np


def probe(spec: str, a_shape, b_shape, precision, use_jit: bool, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(a_shape).astype(np.float32)
    b = rng.standard_normal(b_shape).astype(np.float32)
    want = np.einsum(spec, a.astype(np.float64), b.astype(np.float64))
    fn = lambda a, b: jnp.einsum(spec, a, b, precision=precision)
    got = np.asarray((jax.jit(fn) if use_jit else fn)(jnp.asarray(a), jnp.asarray(b)), np.float64)
    err = float(np.max(np.abs(got - want)))
    hlo = jax.jit(fn).lower(jnp.asarray(a), jnp.asarray(b)).compile().as_text()
    calls = sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo)))
    algo = sorted(set(re.findall(r'algorithm=(\w+)', hlo)))
    return (f"{spec:22s} {str(a_shape):18s} {str(b_shape):14s} precision={str(precision):8s} "
            f"jit={use_jit!s:5s} max|err|={err:.3g} calls={calls} algorithm={algo}")


def main() -> int:
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, x64={jax.config.jax_enable_x64}")
    cases = [
        ("bxyhd,bmhd->bxyhm", (1, 3, 4, 2, 8), (1, 5, 2, 8)),   # the merge test's logits
        ("bxyhm,bmhd->bxyhd", (1, 3, 4, 2, 5), (1, 5, 2, 8)),   # its weighted sum
        ("bnhgd,bmhd->bnhgm", (1, 13, 2, 1, 8), (1, 2, 2, 8)),  # dense_attention, 2 extra keys
        ("ij,jk->ik", (64, 64), (64, 64)),
        ("ij,jk->ik", (512, 256), (256, 128)),
    ]
    for spec, a, b in cases:
        for precision in ("highest", "high", None):
            for use_jit in (True, False):
                print(probe(spec, a, b, precision, use_jit), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
