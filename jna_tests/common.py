"""Shared helpers: problem configs, random inputs, and comparisons that print the config."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jna_tests import oracle


@dataclasses.dataclass(frozen=True)
class Config:
    """One NA problem. Per-axis fields are tuples of length ``len(shape)``."""

    shape: tuple
    kernel_size: tuple
    stride: tuple
    dilation: tuple
    is_causal: tuple
    batch: int = 1
    heads: int = 2
    heads_kv: int = 1
    dim: int = 8
    dim_v: int = 8
    n_extra: int = 0
    scale: Optional[float] = None

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.shape)

    def na_kwargs(self) -> dict:
        """Keyword arguments of jna.na*d / the oracle describing the window."""
        return dict(kernel_size=self.kernel_size, stride=self.stride, dilation=self.dilation,
                    is_causal=self.is_causal)

    def short(self) -> str:
        """A compact id, e.g. ``L12x9_K5x3_s2x1_d1x3_c01_B1H4/2_D8/12_x3``."""
        j = lambda t: "x".join(str(int(a)) for a in t)
        sc = "" if self.scale is None else f"_sc{self.scale:.2f}"
        return (f"L{j(self.shape)}_K{j(self.kernel_size)}_s{j(self.stride)}_d{j(self.dilation)}"
                f"_c{''.join(str(int(c)) for c in self.is_causal)}_B{self.batch}"
                f"H{self.heads}/{self.heads_kv}_D{self.dim}/{self.dim_v}_x{self.n_extra}{sc}")


@dataclasses.dataclass
class Inputs:
    """Random inputs of a Config, already rounded to the test dtype (extras None if unused)."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    extra_k: Optional[jax.Array]
    extra_v: Optional[jax.Array]
    dout: jax.Array
    dlse: jax.Array


def make_inputs(cfg: Config, dtype=jnp.float32, seed: int = 0) -> Inputs:
    """Standard-normal q/k/v (and extras), cotangents for out and lse; fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    b, x = cfg.batch, cfg.shape
    arr = lambda *s: jnp.asarray(rng.standard_normal(s, dtype=np.float32)).astype(dtype)
    q = arr(b, *x, cfg.heads, cfg.dim)
    k = arr(b, *x, cfg.heads_kv, cfg.dim)
    v = arr(b, *x, cfg.heads_kv, cfg.dim_v)
    ek = ev = None
    if cfg.n_extra:
        ek = arr(b, cfg.n_extra, cfg.heads_kv, cfg.dim)
        ev = arr(b, cfg.n_extra, cfg.heads_kv, cfg.dim_v)
    dout = arr(b, *x, cfg.heads, cfg.dim_v)
    dlse = jnp.asarray(rng.standard_normal((b, *x, cfg.heads), dtype=np.float32))
    return Inputs(q, k, v, ek, ev, dout, dlse)


def f64(a):
    """A jax/numpy array (any float dtype, incl. bf16) as float64 numpy."""
    return None if a is None else np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def oracle_fwd(cfg: Config, inp: Inputs):
    """``(out, lse)`` of the float64 oracle on the (already rounded) inputs."""
    return oracle.na(f64(inp.q), f64(inp.k), f64(inp.v), **cfg.na_kwargs(), scale=cfg.scale,
                     extra_k=f64(inp.extra_k), extra_v=f64(inp.extra_v))


def oracle_bwd(cfg: Config, inp: Inputs):
    """``(dq, dk, dv, d_extra_k, d_extra_v)`` of the oracle for cotangents ``inp.dout/dlse``."""
    return oracle.na_bwd(f64(inp.q), f64(inp.k), f64(inp.v), f64(inp.dout), f64(inp.dlse),
                         **cfg.na_kwargs(), scale=cfg.scale,
                         extra_k=f64(inp.extra_k), extra_v=f64(inp.extra_v))


def assert_abs(got, want, atol: float, what: str, cfg=None):
    """Max-abs error check whose message names the tensor, worst index and config."""
    got, want = f64(got), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape} [{cfg}]"
    err = np.abs(got - want)
    err = np.where(np.isnan(err), np.inf, err)  # a NaN is a failure, not a pass
    worst = np.unravel_index(np.argmax(err), err.shape) if err.size else ()
    assert err.size == 0 or err.max() <= atol, (
        f"{what}: max abs err {err.max():.3g} > {atol:g} at {worst} "
        f"(got {got[worst]:.6g}, want {want[worst]:.6g}) [{cfg}]")


def assert_rel_l2(got, want, rtol: float, what: str, cfg=None):
    """Relative L2 error check (``||got - want|| / ||want||``); NaN fails."""
    got, want = f64(got), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape} [{cfg}]"
    err = oracle.rel_l2(got, want)
    assert err <= rtol, f"{what}: relative L2 err {err:.3g} > {rtol:g} [{cfg}]"


def na_fn(rank: int):
    """The public per-rank entry point: jna.na1d / na2d / na3d."""
    import jna

    return {1: jna.na1d, 2: jna.na2d, 3: jna.na3d}[rank]


def run_na(cfg: Config, inp: Inputs, backend: str, grads: bool):
    """Runs the library (jitted): returns ``(out, lse, grads or None)``.

    Gradients are of ``<out, dout> + <lse, dlse>`` wrt q, k, v (and extra k/v), i.e. the VJP
    with cotangents for both outputs.
    """
    fn = na_fn(cfg.rank)

    def f(q, k, v, ek, ev):
        return fn(q, k, v, **cfg.na_kwargs(), scale=cfg.scale, additional_keys=ek,
                  additional_values=ev, return_lse=True, backend=backend)

    def fwd(q, k, v, ek, ev, dout, dlse):
        if not grads:
            out, lse = f(q, k, v, ek, ev)
            return out, lse, None
        (out, lse), vjp = jax.vjp(f, q, k, v, ek, ev)
        return out, lse, vjp((dout, dlse))

    return jax.jit(fwd)(inp.q, inp.k, inp.v, inp.extra_k, inp.extra_v, inp.dout, inp.dlse)


def assert_names(err: Exception, name: str, axis=None):
    """The error message names the argument and, when given, the axis (``name[i]``/``axis i``)."""
    msg = str(err)
    assert re.search(rf"\b{re.escape(name)}\b", msg), f"{name!r} not named in: {msg!r}"
    if axis is not None:
        assert f"[{axis}]" in msg or f"axis {axis}" in msg, f"axis {axis} not named in: {msg!r}"


def layer_classes(framework: str) -> dict:
    """rank -> the ``NeighborhoodAttention{1,2,3}D`` class of ``"linen"`` or ``"nnx"``."""
    import jna.nn
    import jna.nnx

    module = {"linen": jna.nn, "nnx": jna.nnx}[framework]
    return {rank: getattr(module, f"NeighborhoodAttention{rank}D") for rank in (1, 2, 3)}
