"""The main job: run a default 2-D problem on every backend this device can run, and print a table.

    python -m jna.demo [--size 64] [--kernel 7] [--heads 4] [--head-dim 32] [--dtype float32]

Times are medians of repeated runs after warm-up, synchronized with ``block_until_ready``.
Every jna backend that runs natively here is timed (Pallas backends in CPU interpret mode are
for tests, not timing). Beside them it times dense attention with the NA mask (``masked-dense``: what you
would write without jna, O(N^2) memory), and reports each backend's max abs error against the
reference backend.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import jax
import jax.numpy as jnp
import numpy as np

import jna
from jna import backends, semantics
from jna.tuning.timing import median_ms


def _na_mask(params: semantics.NAParams) -> np.ndarray:
    """Dense ``[N, N]`` allowed-pairs mask (host), for the masked-dense baseline."""
    coords = np.array(list(itertools.product(*map(range, params.spatial_shape))))
    mask = np.ones((len(coords), len(coords)), bool)
    for axis in range(params.rank):
        length, k, s, d, causal = params.axis(axis)
        mask &= semantics.key_allowed(coords[:, axis, None], coords[None, :, axis], length, k, s, d, causal)
    return mask


def _masked_dense(q, k, v, mask):
    batch, *spatial, heads, dim = q.shape
    flat = lambda x: x.reshape(batch, -1, *x.shape[-2:])
    out = jax.nn.dot_product_attention(flat(q), flat(k), flat(v), mask=mask[None, None])
    return out.reshape(q.shape[:-1] + (v.shape[-1],))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    on_gpu = jax.default_backend() == "gpu"
    parser.add_argument("--size", type=int, default=128 if on_gpu else 48, help="map is size x size")
    parser.add_argument("--kernel", type=int, default=13 if on_gpu else 7)
    parser.add_argument("--heads", type=int, default=8 if on_gpu else 4)
    parser.add_argument("--head-dim", type=int, default=64 if on_gpu else 32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16" if on_gpu else "float32")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args(argv)

    dtype = jnp.dtype(args.dtype)
    shape = (args.batch, args.size, args.size, args.heads, args.head_dim)
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, dout = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys)
    params = semantics.normalize_params((args.size, args.size), args.kernel)

    print(f"jna {jna.__version__} | jax {jax.__version__} | device: {jax.devices()[0].device_kind} "
          f"({jax.default_backend()})")
    print(f"problem: na2d, batch {args.batch}, map {args.size}x{args.size}, kernel {args.kernel}x{args.kernel}, "
          f"heads {args.heads}, head_dim {args.head_dim}, {dtype.name}")

    candidates = {}
    for name in backends.native_backends():
        candidates[name] = functools.partial(jna.na2d, kernel_size=args.kernel, backend=name)
    n = args.size * args.size
    if n * n * args.batch * args.heads * 4 <= 2**31:
        mask = jnp.asarray(_na_mask(params))
        candidates["masked-dense"] = functools.partial(_masked_dense, mask=mask)

    reference_out = jax.jit(candidates["reference"])(q, k, v)
    rows = []
    for name, fn in candidates.items():
        forward = jax.jit(fn)

        def loss(q, k, v, fn=fn):
            return jnp.sum(fn(q, k, v).astype(jnp.float32) * dout.astype(jnp.float32))

        forward_backward = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        try:
            out = forward(q, k, v)
            error = float(jnp.max(jnp.abs(out.astype(jnp.float32) - reference_out.astype(jnp.float32))))
            fwd = median_ms(forward, q, k, v, repeats=args.runs)
            fwd_bwd = median_ms(forward_backward, q, k, v, repeats=args.runs)
        except NotImplementedError as e:  # a backend this device cannot run: say so, keep going
            rows.append((name, "-", "-", f"not run: {e}"))
            continue
        rows.append((name, f"{fwd:.2f}", f"{fwd_bwd:.2f}", f"{error:.1e}"))

    header = ("backend", "forward ms", "fwd+bwd ms", "max |err| vs reference")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(4)]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))


if __name__ == "__main__":
    main()
