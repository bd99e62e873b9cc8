"""The tests every backend passes, written once (tokamax's ``test_base`` pattern).

`BackendTestBase` holds the backend's own checks: the oracle sweep (out, lse and every gradient
of random problems and fixed edge cases against the float64 oracle), NaN isolation, and (where
the backend runs natively on float32) the no-N-by-N memory check. Each backend subclasses it once,
in ``jna_tests/test_backend_<name>.py``, naming the backend; its capability flags
(`jna_tests.backends.Capabilities`: dtypes, gradients, additional KV, head dims, case counts)
decide which tests and cases it gets, so a backend never carries a skipped test:

- a backend that does not run on this platform (fused-mosaic on a CPU: its kernels run in the
  Mosaic GPU simulator there, `test_fused_mosaic_sim.py`) collects no tests;
- tests outside its capabilities are not defined on its class (`requires`);
- the sweep's cases are generated per class (`conftest.pytest_generate_tests` calls
  `generate`), the first ``FAST_CASES`` float32 ones per rank in ``make test``, the rest marked
  ``slow``.

float32: out and lse within 1e-4 abs, gradients of q/k/v (and additional k/v) for random
cotangents of both out and lse within 1e-3 abs. bf16/fp16: relative L2 within the backend's
``lowp_rtol`` (1e-2) for out, lse and gradients, against the oracle on the same rounded inputs.
Every failure prints the config.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jna
from jna_tests import oracle
from jna_tests.backends import BACKENDS, active_backends, native_backends
from jna_tests.common import (Config, assert_abs, assert_rel_l2, make_inputs, oracle_bwd,
                              oracle_fwd, run_na)
from jna_tests.sweep_cases import sweep_cases

GRAD_NAMES = ("dq", "dk", "dv", "d_additional_keys", "d_additional_values")
N_TOKENS = 256 * 256
DENSE_BYTES = N_TOKENS * N_TOKENS * 4  # one float32 [N, N] matrix: 17 GB
# Measured on CPU with the reference backend (jax 0.11.2): ~326 MiB forward, ~535 MiB fwd+bwd.
MAX_TEMP_BYTES = 2 * 2**30




def requires(predicate):
    """Marks a test as needing ``predicate(backend) -> bool``; subclasses whose backend fails it
    do not define the test."""
    def mark(test):
        test.requires = predicate
        return test
    return mark


def _float32(backend: str) -> bool:
    return jnp.float32 in BACKENDS[backend].dtypes


def _native_float32(backend: str) -> bool:
    return backend in native_backends() and jnp.float32 in BACKENDS[backend].dtypes


class BackendTestBase:
    """Subclass once per backend, setting ``backend`` (a name of `jna_tests.backends.BACKENDS`)."""

    backend: ClassVar[str]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.backend not in active_backends():
            cls.__test__ = False  # not on this platform, or narrowed away by JNA_TEST_BACKENDS
            return
        for name in dir(cls):
            test = getattr(cls, name)
            if name.startswith("test_") and not getattr(test, "requires", lambda b: True)(cls.backend):
                setattr(cls, name, None)

    @classmethod
    def caps(cls):
        return BACKENDS[cls.backend]

    @classmethod
    def generate(cls, metafunc):
        """Parametrizes the sweep with this backend's cases (called from conftest)."""
        if metafunc.function.__name__ == "test_sweep_against_oracle":
            metafunc.parametrize("dtype,cfg,seed", list(sweep_cases(cls.backend)))

    def test_sweep_against_oracle(self, dtype, cfg, seed):
        """Out, lse and all gradients of one random problem vs the float64 oracle."""
        backend = self.backend
        caps = self.caps()
        inp = make_inputs(cfg, dtype, seed=seed)
        out, lse, grads = run_na(cfg, inp, backend, grads=caps.grads)
        want_out, want_lse = oracle_fwd(cfg, inp)
        info = f"{cfg.short()} dtype={jnp.dtype(dtype).name} backend={backend} {cfg}"
        assert out.dtype == dtype and lse.dtype == jnp.float32, (out.dtype, lse.dtype, info)
        if dtype == jnp.float32:
            assert_abs(out, want_out, 1e-4, "out", info)
            assert_abs(lse, want_lse, 1e-4, "lse", info)
        else:
            assert_rel_l2(out, want_out, caps.lowp_rtol, "out", info)
            assert_rel_l2(lse, want_lse, caps.lowp_rtol, "lse", info)
        if not caps.grads:
            return
        want_grads = oracle_bwd(cfg, inp)
        for name, g, w, x in zip(GRAD_NAMES, grads, want_grads,
                                 (inp.q, inp.k, inp.v, inp.extra_k, inp.extra_v)):
            assert (g is None) == (w is None), (name, info)
            if w is None:
                continue
            assert g.dtype == x.dtype, (name, g.dtype, x.dtype, info)
            if dtype == jnp.float32:
                assert_abs(g, w, 1e-3, name, info)
            else:
                assert_rel_l2(g, w, caps.lowp_rtol, name, info)

    @requires(_float32)
    @pytest.mark.parametrize("where", ["k", "v"])
    def test_nan_stays_inside_the_windows_that_contain_it(self, where):
        """A NaN key/value at one position poisons exactly the queries whose window holds it;
        every other output (and lse) is finite and equals the oracle."""
        cfg = Config((9, 10), (3, 4), (1, 2), (2, 1), (False, True), batch=2, heads=2, heads_kv=1)
        inp = make_inputs(cfg, seed=50)
        pos = (0, 4, 5)  # batch 0, spatial (4, 5)
        bad = getattr(inp, where).at[pos].set(jnp.nan)
        args = dict(q=inp.q, k=inp.k, v=inp.v)
        args[where] = bad
        out, lse = jna.na2d(**args, **cfg.na_kwargs(), return_lse=True, backend=self.backend)
        want_out, want_lse = oracle_fwd(cfg, inp)  # clean inputs: same result off the NaN windows
        mask = oracle.na_mask(cfg.shape, **cfg.na_kwargs())
        sees = mask[:, 4 * 10 + 5].reshape(cfg.shape)  # queries whose window contains (4, 5)
        assert 0 < sees.sum() < sees.size
        out, lse = np.asarray(out), np.asarray(lse)
        assert np.isnan(out[0][sees]).all(), "queries seeing the NaN must be NaN"
        if where == "k":
            assert np.isnan(lse[0][sees]).all()
        else:
            assert_abs(lse[0][sees], want_lse[0][sees], 1e-4, "lse of queries seeing a NaN value")
        assert_abs(out[0][~sees], want_out[0][~sees], 1e-4, "out off the NaN windows")
        assert_abs(lse[0][~sees], want_lse[0][~sees], 1e-4, "lse off the NaN windows")
        assert_abs(out[1], want_out[1], 1e-4, "out of the other batch element")

    @requires(_native_float32)
    def test_large_map_never_materializes_n_by_n(self):
        """na2d on [1, 256, 256, 4, 32] with K = 13 compiles with temp memory far below N*N*4 bytes
        (forward and backward) and the forward runs, finite, on a spot-checked query."""
        shape = (1, 256, 256, 4, 32)
        spec = jax.ShapeDtypeStruct(shape, jnp.float32)
        f = jax.jit(functools.partial(jna.na2d, kernel_size=13, backend=self.backend))
        fwd = f.lower(spec, spec, spec).compile()
        temp = fwd.memory_analysis().temp_size_in_bytes
        assert MAX_TEMP_BYTES <= DENSE_BYTES / 8
        assert temp < MAX_TEMP_BYTES, f"forward temp {temp / 2**20:.0f} MiB"
        loss = lambda q, k, v: f(q, k, v).sum()
        bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile()
        temp = bwd.memory_analysis().temp_size_in_bytes
        assert temp < MAX_TEMP_BYTES, f"backward temp {temp / 2**20:.0f} MiB"

        keys = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.random.normal(key, shape, jnp.float32) for key in keys)
        out = fwd(q, k, v)
        assert out.shape == shape
        # Oracle on the 13x13 window of query (100, 250) (non-causal, s = d = 1: start clamps).
        x, y = 100, 250
        x0, y0 = x - 6, 256 - 13
        kw = np.asarray(k[0, x0:x0 + 13, y0:y0 + 13], np.float64).reshape(169, 4, 32)
        vw = np.asarray(v[0, x0:x0 + 13, y0:y0 + 13], np.float64).reshape(169, 4, 32)
        qx = np.asarray(q[0, x, y], np.float64)
        want, _ = oracle.attention(qx[None, None], kw[None], vw[None], np.ones((1, 169), bool))
        assert_abs(out[0, x, y], want[0, 0], 1e-4, "out[0, 100, 250]")
