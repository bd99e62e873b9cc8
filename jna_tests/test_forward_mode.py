"""Forward-mode autodiff through the kernel backends (`jna._src.forward_mode`), on the CPU.

fused-triton and unfused run in interpret mode here, fused-mosaic in the Mosaic GPU simulator. The oracle for a tangent is the float64 oracle
(`jna_tests.oracle`, numpy) differentiated by central differences, so neither side uses JAX's
autodiff; the gradient of a loss built from a JVP is checked along a direction against nested
float64 central differences of that oracle.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jna
from jna_tests import oracle
from jna_tests.common import Config, f64, make_inputs

BACKEND = "fused-triton"
CASES = {
    "2d-dilated-causal-gqa": Config((12, 10), (5, 3), (1, 1), (2, 1), (False, True), heads=2,
                                    heads_kv=1, dim=16, dim_v=16),
    "1d-strided-dv": Config((40,), (9,), (3,), (1,), (False,), heads=2, heads_kv=2, dim=8, dim_v=16),
}


def _tangents(cfg: Config, seed: int):
    rng = np.random.default_rng(seed)
    t = lambda *s: jnp.asarray(rng.standard_normal(s, dtype=np.float32))
    b, x = cfg.batch, cfg.shape
    return (t(b, *x, cfg.heads, cfg.dim), t(b, *x, cfg.heads_kv, cfg.dim), t(b, *x, cfg.heads_kv, cfg.dim_v))


def _na(cfg: Config, backend=BACKEND):
    return functools.partial(jna.neighborhood_attention, **cfg.na_kwargs(), return_lse=True, backend=backend)


def _oracle(cfg: Config, q, k, v):
    return oracle.na(q, k, v, **cfg.na_kwargs())


def _oracle_tangent(cfg: Config, primals, tangents, eps=1e-5):
    """Central difference of the float64 oracle along ``tangents``: ``(tout, tlse)``."""
    plus = _oracle(cfg, *(p + eps * t for p, t in zip(primals, tangents)))
    minus = _oracle(cfg, *(p - eps * t for p, t in zip(primals, tangents)))
    return tuple((a - b) / (2 * eps) for a, b in zip(plus, minus))


@pytest.mark.parametrize("backend", [BACKEND, "unfused"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_jvp_matches_the_oracle(name, backend):
    cfg = CASES[name]
    inp = make_inputs(cfg, jnp.float32, seed=3)
    tangents = _tangents(cfg, 4)
    _check_jvp_against_the_oracle(cfg, _na(cfg, backend), (inp.q, inp.k, inp.v), tangents,
                                  out_tol=1e-5, lse_tol=1e-5, tangent_tol=1e-4)


def _check_jvp_against_the_oracle(cfg, f, primals, tangents, out_tol, lse_tol, tangent_tol):
    """jvp of ``f`` (out, lse and their tangents) against the float64 oracle and its central
    differences: relative L2 for out and the tangents, max abs for lse."""
    (out, lse), (tout, tlse) = jax.jit(lambda p, t: jax.jvp(f, p, t))(primals, tangents)
    p64 = tuple(f64(x) for x in primals)
    want_out, want_lse = _oracle(cfg, *p64)
    want_tout, want_tlse = _oracle_tangent(cfg, p64, tuple(f64(t) for t in tangents))
    assert oracle.rel_l2(f64(out), want_out) < out_tol
    assert np.max(np.abs(f64(lse) - want_lse)) < lse_tol
    assert oracle.rel_l2(f64(tout), want_tout) < tangent_tol, oracle.rel_l2(f64(tout), want_tout)
    assert oracle.rel_l2(f64(tlse), want_tlse) < tangent_tol, oracle.rel_l2(f64(tlse), want_tlse)


def test_jvp_in_bfloat16_within_half_precision_tolerance():
    cfg = CASES["2d-dilated-causal-gqa"]
    inp = make_inputs(cfg, jnp.bfloat16, seed=5)
    tangents = tuple(t.astype(jnp.bfloat16) for t in _tangents(cfg, 6))
    _, (tout, tlse) = jax.jvp(_na(cfg), (inp.q, inp.k, inp.v), tangents)
    assert tout.dtype == jnp.bfloat16 and tlse.dtype == jnp.float32
    want_tout, want_tlse = _oracle_tangent(cfg, tuple(f64(x) for x in (inp.q, inp.k, inp.v)),
                                           tuple(f64(t) for t in tangents))
    assert oracle.rel_l2(f64(tout), want_tout) < 2e-2
    assert oracle.rel_l2(f64(tlse), want_tlse) < 2e-2


@pytest.mark.parametrize("backend", [BACKEND, "unfused"])
def test_gradient_of_a_jvp_loss_along_a_direction(backend):
    """``grad(q -> sum(w * jvp(f, (q, k, v), t)[1].out))`` against nested float64 differences
    (unfused: every term from its bilinear kernels; fused: the second-order term by the reference)."""
    cfg = CASES["2d-dilated-causal-gqa"]
    inp = make_inputs(cfg, jnp.float32, seed=7)
    tangents = _tangents(cfg, 8)
    rng = np.random.default_rng(9)
    w = rng.standard_normal(inp.dout.shape)
    u = rng.standard_normal(inp.q.shape)  # the direction in q

    def loss(q):
        _, (tout, tlse) = jax.jvp(_na(cfg, backend), (q, inp.k, inp.v), tangents)
        return jnp.sum(jnp.asarray(w, jnp.float32) * tout) + jnp.sum(jnp.sin(tlse))

    got = float(jnp.sum(jax.jit(jax.grad(loss))(inp.q) * jnp.asarray(u, jnp.float32)))

    k64, v64, t64 = f64(inp.k), f64(inp.v), tuple(f64(t) for t in tangents)

    def loss64(q):
        tout, tlse = _oracle_tangent(cfg, (q, k64, v64), t64, eps=1e-4)
        return np.sum(w * tout) + np.sum(np.sin(tlse))

    eps = 1e-3
    want = (loss64(f64(inp.q) + eps * u) - loss64(f64(inp.q) - eps * u)) / (2 * eps)
    assert abs(got - want) <= 1e-3 * abs(want) + 1e-3, (got, want)


@pytest.mark.slow  # ~21 s; `make test`'s budget (grad of a JVP loss and vmap-of-jvp stay in it)
def test_transforms_compose_with_the_tangent_kernel():
    """vmap of a jvp (one launch: the mapped axis folds into the heads), jacfwd, linearize,
    jacrev and vmap of a grad agree with the reference backend (plain JAX autodiff)."""
    cfg = CASES["1d-strided-dv"]
    inp = make_inputs(cfg, jnp.float32, seed=11)
    q, k, v = inp.q, inp.k, inp.v
    tq, tk, tv = _tangents(cfg, 12)
    rel = lambda a, b: oracle.rel_l2(f64(a), f64(b))

    def compare(transform):
        for got, want in zip(jax.tree.leaves(transform(_na(cfg))), jax.tree.leaves(transform(_na(cfg, "reference")))):
            assert rel(got, want) < 1e-4, transform

    compare(lambda f: jax.vmap(lambda t: jax.jvp(f, (q, k, v), (t, tk, tv))[1])(jnp.stack([tq, -2 * tq])))
    small = v[0, 5:7, 1]

    def with_small(vv):
        return v.at[0, 5:7, 1].set(vv)

    compare(lambda f: jax.jacfwd(lambda vv: f(q, k, with_small(vv))[0][0, 6, 1])(small))
    compare(lambda f: jax.jacrev(lambda vv: f(q, k, with_small(vv))[0][0, 6, 1])(small))
    compare(lambda f: jax.linearize(f, q, k, v)[1](tq, tk, tv))
    compare(lambda f: jax.vmap(jax.grad(lambda q: jnp.sum(f(q, k, v)[0] ** 2)))(jnp.stack([q, 0.5 * q])))


def test_unfused_vmap_of_jvp_folds_into_heads():
    """vmap over tangents of unfused's bilinear primitives (the mapped axis folded into the heads)."""
    cfg = CASES["1d-strided-dv"]
    inp = make_inputs(cfg, jnp.float32, seed=17)
    tq, tk, tv = _tangents(cfg, 18)
    batched = lambda f: jax.vmap(lambda t: jax.jvp(f, (inp.q, inp.k, inp.v), (tq, t, tv))[1])(jnp.stack([tk, 3 * tk]))
    for got, want in zip(batched(_na(cfg, "unfused")), batched(_na(cfg, "reference"))):
        assert oracle.rel_l2(f64(got), f64(want)) < 1e-4


def test_reverse_mode_runs_the_backward_kernels_not_the_tangent_kernel():
    """`jax.grad` of a fused call lowers to the forward, dQ and dK/dV kernels (the tangent
    primitive's transpose), as with the custom VJP; a JVP adds the tangent kernel."""
    cfg = CASES["2d-dilated-causal-gqa"]
    inp = make_inputs(cfg, jnp.float32)
    f = _na(cfg)
    grad = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v)[0] ** 2) + jnp.sum(f(q, k, v)[1]), argnums=(0, 1, 2))
    names = lambda fn, *a: sorted(set(re.findall(r"jna_fused_na_(?:tangent|fwd|dkv|dq)", str(jax.make_jaxpr(fn)(*a)))))
    assert names(grad, inp.q, inp.k, inp.v) == ["jna_fused_na_dkv", "jna_fused_na_dq", "jna_fused_na_fwd"]
    assert "jna_na_tangent" not in str(jax.make_jaxpr(grad)(inp.q, inp.k, inp.v))
    jvp = lambda p, t: jax.jvp(f, p, t)
    jaxpr = str(jax.make_jaxpr(jvp)((inp.q, inp.k, inp.v), _tangents(cfg, 1)))
    assert "jna_na_tangent" in jaxpr and "jna_fused_na_dq" not in jaxpr  # the tangent primitive


def test_additional_keys_and_return_lse_carry_tangents():
    cfg = CASES["1d-strided-dv"]
    inp = make_inputs(cfg, jnp.float32, seed=13)
    rng = np.random.default_rng(14)
    ek = jnp.asarray(rng.standard_normal((cfg.batch, 3, cfg.heads_kv, cfg.dim)), jnp.float32)
    ev = jnp.asarray(rng.standard_normal((cfg.batch, 3, cfg.heads_kv, cfg.dim_v)), jnp.float32)
    tq, tk, tv = _tangents(cfg, 15)

    def f(backend):
        return lambda q, k, v, ek, ev: jna.neighborhood_attention(
            q, k, v, **cfg.na_kwargs(), additional_keys=ek, additional_values=ev, return_lse=True,
            backend=backend)

    primals, tangents = (inp.q, inp.k, inp.v, ek, ev), (tq, tk, tv, 0.5 * ek, -ev)
    got = jax.jvp(f(BACKEND), primals, tangents)[1]
    want = jax.jvp(f("reference"), primals, tangents)[1]
    for a, b in zip(got, want):
        assert oracle.rel_l2(f64(a), f64(b)) < 1e-4


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tangent_kernel_lowers_to_triton_for_cuda(dtype, monkeypatch):
    """The tangent kernel (and, for a JVP of a grad-free call, only it beside the forward)
    lowers to Triton IR for an sm90 GPU from this machine (`jax.export`; as in test_unfused.py:
    Triton rejects what interpret mode accepts); vmap of a JVP stays one tangent launch."""
    from jax import export

    from jna._src import compat
    from jna.backends.triton import fused as fused_triton

    monkeypatch.setattr(fused_triton, "_interpret", lambda: False)
    spec = jax.ShapeDtypeStruct
    window = dict(kernel_size=(5, 7), stride=(1, 2), dilation=(2, 1), is_causal=(False, True))
    q, k, v = spec((2, 20, 24, 4, 32), dtype), spec((2, 20, 24, 2, 32), dtype), spec((2, 20, 24, 2, 64), dtype)
    f = lambda q, k, v: jna.na2d(q, k, v, **window, backend=BACKEND, return_lse=True)
    jvp = lambda p, t: jax.jvp(f, p, t)
    batched = lambda p, t: jax.vmap(lambda tq: jax.jvp(f, p, (tq, *t[1:])))(jnp.stack([t[0], t[0]]))
    triton = "__gpu$xla.gpu.triton"
    for name, fn in (("jvp", jvp), ("vmap jvp", batched)):
        with compat.triton_lowering_for_cuda(90):
            text = export.export(jax.jit(fn), platforms=["cuda"],
                                 disabled_checks=[export.DisabledSafetyCheck.custom_call(triton)])(
                (q, k, v), (q, k, v)).mlir_module()
        # The forward, its non-finite variant (a second launch that returns at once when every
        # value is finite) and one tangent kernel.
        assert text.count("jna_fused_na_tangent") >= 1 and text.count(triton) == 3, (name, text.count(triton))


# ---- fused-mosaic: the same tangent kernel on its plan, in the Mosaic GPU simulator ----------

MOSAIC_CASE = Config((200,), (40,), (3,), (2,), (True,), heads=2, heads_kv=1, dim=64, dim_v=64)


def _simulate_mosaic() -> dict:
    """In a subprocess (NPROC=8, see test_fused_mosaic_sim.py): jvp and grad of a simulated
    fused-mosaic call against the float64 oracle (tangent by central differences)."""
    from jna._src import compat
    from jna._src.arguments import check_call
    from jna.backends.mosaic import op as fused_mosaic

    cfg = MOSAIC_CASE
    inp = make_inputs(cfg, jnp.bfloat16, seed=21)
    tangents = tuple(t.astype(jnp.bfloat16) for t in _tangents(cfg, 22))
    problem = check_call(inp.q, inp.k, inp.v, cfg.kernel_size, cfg.stride, cfg.dilation, cfg.is_causal,
                         None, None, None, None)
    sim = compat.mosaic_simulator(detect_races=True)
    f = lambda q, k, v: fused_mosaic._run(q, k, v, problem, fused_mosaic.MosaicConfig((64,), (64,), 2), sim)
    primals = (inp.q, inp.k, inp.v)
    (out, _), (tout, tlse) = jax.jvp(f, primals, tangents)
    batched = jax.vmap(lambda t: jax.jvp(f, primals, (t, *tangents[1:]))[1])(jnp.stack(tangents[:1] * 2))
    grads = jax.grad(lambda *p: jnp.sum(f(*p)[0].astype(jnp.float32) * inp.dout.astype(jnp.float32)),
                     argnums=(0, 1, 2))(*primals)
    p64 = tuple(f64(x) for x in primals)
    want_out, _ = _oracle(cfg, *p64)
    want_tout, want_tlse = _oracle_tangent(cfg, p64, tuple(f64(t) for t in tangents))
    want_grads = oracle.na_bwd(*p64, f64(inp.dout), np.zeros(inp.dlse.shape), **cfg.na_kwargs())[:3]
    return dict(out=oracle.rel_l2(f64(out), want_out), tout=oracle.rel_l2(f64(tout), want_tout),
                tlse=oracle.rel_l2(f64(tlse), want_tlse),
                vmap=max(oracle.rel_l2(f64(batched[0][i]), f64(tout)) for i in range(2)),
                grads=[oracle.rel_l2(f64(g), w) for g, w in zip(grads, want_grads)],
                races=compat.simulator_races_found())


def test_fused_mosaic_jvp_in_the_simulator():
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu", NPROC="8")
    proc = subprocess.run([sys.executable, "-m", "jna_tests.test_forward_mode", "mosaic"], env=env,
                          capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert rows, f"rc {proc.returncode}: {proc.stderr[-3000:]}"
    r = rows[-1]
    assert not r["races"]
    assert r["out"] < 1e-2 and r["tout"] < 1e-2 and r["tlse"] < 1e-2, r
    assert r["vmap"] == 0.0, r  # the batched launch computes the same values
    assert max(r["grads"]) < 1e-2, r


# ---- On the GPU: both fused backends with real kernels (deselected on CPU: marked gpu) -------

GPU_CASES = {
    "1d-causal-dilated": Config((200,), (40,), (3,), (2,), (True,), heads=2, heads_kv=1, dim=64, dim_v=64),
    "2d-strided-causal-gqa": Config((24, 20), (5, 7), (1, 2), (2, 1), (False, True), batch=2, heads=4,
                                    heads_kv=2, dim=64, dim_v=64),
    "3d": Config((6, 8, 10), (3, 5, 3), (1, 1, 2), (1, 1, 2), (True, False, False), heads=2, heads_kv=2,
                 dim=128, dim_v=128),
}
gpu_only = pytest.mark.skipif(jax.default_backend() != "gpu", reason="GPU only")


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("backend", ["fused-triton", "fused-mosaic", "unfused"])
@pytest.mark.parametrize("name", sorted(GPU_CASES))
def test_gpu_jvp_and_grad_of_jvp_against_the_oracle(name, backend, dtype):
    """Output, lse, tangents (float64 central differences of the oracle) and the gradient of a
    JVP loss (against the reference backend's plain autodiff on the upcast inputs)."""
    cfg = GPU_CASES[name]
    inp = make_inputs(cfg, dtype, seed=31)
    tangents = tuple(t.astype(dtype) for t in _tangents(cfg, 32))
    primals = (inp.q, inp.k, inp.v)
    f = _na(cfg, backend)
    _check_jvp_against_the_oracle(cfg, f, primals, tangents, out_tol=1e-2, lse_tol=2e-2, tangent_tol=2e-2)

    w = jnp.asarray(np.random.default_rng(33).standard_normal(inp.dout.shape), jnp.float32)

    def loss(fn, dtype, q, k, v):
        _, (to, tl) = jax.jvp(fn, (q, k, v), tuple(t.astype(dtype) for t in tangents))
        return jnp.sum(w * to.astype(jnp.float32)) + jnp.sum(jnp.sin(tl))

    grad = lambda fn, dtype: jax.jit(jax.grad(functools.partial(loss, fn, dtype), argnums=(0, 1, 2)))
    got = grad(f, dtype)(*primals)
    want = grad(_na(cfg, "reference"), jnp.float32)(*(x.astype(jnp.float32) for x in primals))
    for g, wnt in zip(got, want):
        assert oracle.rel_l2(f64(g), f64(wnt)) < 3e-2, oracle.rel_l2(f64(g), f64(wnt))


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("backend", ["fused-triton", "fused-mosaic"])
def test_gpu_vmap_of_jvp_and_reverse_mode_agree(backend):
    """vmap of a JVP (one batched launch) equals the per-tangent JVPs bitwise; grad through the
    custom JVP equals the forward-mode op's own vjp (the backward kernels) bitwise."""
    cfg = GPU_CASES["2d-strided-causal-gqa"]
    inp = make_inputs(cfg, jnp.bfloat16, seed=41)
    tq, tk, tv = (t.astype(jnp.bfloat16) for t in _tangents(cfg, 42))
    f = _na(cfg, backend)
    primals = (inp.q, inp.k, inp.v)
    one = lambda t: jax.jvp(f, primals, (t, tk, tv))[1]
    batched = jax.jit(jax.vmap(one))(jnp.stack([tq, -tq]))
    for i, t in enumerate((tq, -tq)):
        for a, b in zip(batched, jax.jit(one)(t)):
            assert oracle.rel_l2(f64(a[i]), f64(b)) < 1e-2
    grads = [jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v)[0].astype(jnp.float32) ** 2),
                              argnums=(0, 1, 2)))(*primals) for _ in range(2)]
    for a, b in zip(*grads):
        assert np.array_equal(np.asarray(a), np.asarray(b))  # deterministic


if __name__ == "__main__":
    import json
    import sys

    if sys.argv[1:] == ["mosaic"]:
        print(json.dumps(_simulate_mosaic()), flush=True)
