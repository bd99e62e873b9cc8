"""How fused-triton's kernels mask their walks (issue 16): never, on every step, or per step.

`TilePlan.full_fraction` (the share of visited tile pairs that need no mask) is checked against
a brute-force count from the oracle's element-wise rule, and each masking mode, forced on a
problem whose pairs are partly full, against the float64 oracle (forward, backward), in
interpret mode on the CPU.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jna import semantics
from jna._src import plan as planning
from jna._src.arguments import check_call
from jna.backends.triton import fused as fused_triton
from jna_tests import oracle
from jna_tests.common import Config, f64, make_inputs

KERNELS = ("forward", "dq", "dkv")


def _brute_full_fraction(shape, kernel_size, stride, is_causal, plan) -> float:
    """Share of the aligned walk's visited tile pairs in which every real query of the Q tile
    may attend every key of the KV tile (the oracle's rule; keys past the map are never allowed)."""
    rank = len(shape)
    axes = plan.axes
    visited = full = 0
    for qt in itertools.product(*(range(a.num_q_tiles) for a in axes)):
        ranges = [range(a.kv_first[0, t], a.kv_first[0, t] + a.kv_count[0, t]) for a, t in zip(axes, qt)]
        for kt in itertools.product(*ranges):
            visited += 1
            ok = True
            for a in range(rank):
                qs = [x for x in range(qt[a] * axes[a].q_tile, (qt[a] + 1) * axes[a].q_tile) if x < shape[a]]
                ks = range(kt[a] * axes[a].kv_tile, (kt[a] + 1) * axes[a].kv_tile)
                ok &= all(y < shape[a] and oracle.axis_allowed(x, y, shape[a], kernel_size[a], stride[a], 1,
                                                               is_causal[a]) for x in qs for y in ks)
            full += ok
    return full / visited


@pytest.mark.parametrize("shape,kernel_size,stride,is_causal,q_tile,kv_tile", [
    ((48,), (17,), (1,), (False,), (16,), (8,)),
    ((40,), (40,), (1,), (False,), (16,), (16,)),
    ((30,), (9,), (1,), (True,), (8,), (8,)),
    ((16, 24), (9, 5), (1, 2), (False, False), (4, 8), (4, 4)),
    ((16, 16), (7, 7), (1, 1), (False, False), (8, 8), (8, 16)),
])
def test_full_fraction_counts_every_visited_pair(shape, kernel_size, stride, is_causal, q_tile, kv_tile):
    params = semantics.normalize_params(shape, kernel_size, stride, (1,) * len(shape), is_causal)
    plan = planning.make_plan(params, q_tile, kv_tile)
    want = _brute_full_fraction(shape, kernel_size, stride, is_causal, plan)
    assert plan.full_fraction("kv") == pytest.approx(want, abs=1e-12)
    assert plan.full_fraction("q") == pytest.approx(want, abs=1e-12)


def test_region_walk_full_fraction_is_the_share_of_full_chunks():
    """The key-region walk counts its chunks (`region_full` over `kv_steps`, and the query side)."""
    params = semantics.normalize_params((64,), (33,), (1,), (1,), (False,))
    plan = planning.make_plan(params, (16,), (16,), region=True)
    ax = plan.axes[0]
    assert 0 < plan.full_fraction("kv") < 1
    assert plan.full_fraction("kv") == ax.region_full.sum() / ax.kv_steps.sum()
    assert plan.full_fraction("q") == ax.region_q_full.sum() / ax.q_steps.sum()


CASES = {  # (config, q_tile, kv_tile): the 1-D case has full and partial pairs, the other only full
    "partly-full": (Config((48,), (17,), (1,), (1,), (False,), heads=2, heads_kv=1, dim=16, dim_v=16), (16,), (16,)),
    "all-full": (Config((32,), (32,), (1,), (1,), (False,), heads=2, heads_kv=1, dim=16, dim_v=16), (16,), (16,)),
}


@pytest.mark.parametrize("name,forced", [("partly-full", "always"), ("partly-full", "per-step"),
                                         ("all-full", "never")])
def test_each_masking_mode_matches_the_oracle(name, forced, monkeypatch):
    """out, lse and the gradients through both, with every kernel's walk in one masking mode."""
    cfg, q_tile, kv_tile = CASES[name]
    threshold = {"always": 2.0, "per-step": 0.0, "never": 0.5}[forced]
    monkeypatch.setattr(fused_triton, "MASK_EVERY_STEP_BELOW", {k: threshold for k in KERNELS})
    inp = make_inputs(cfg, jnp.float32, seed=23)
    problem = check_call(inp.q, inp.k, inp.v, cfg.kernel_size, cfg.stride, cfg.dilation, cfg.is_causal,
                         cfg.scale, None, None, None)
    config = dataclasses.replace(fused_triton.default_config(problem), q_tile=q_tile, kv_tile=kv_tile,
                                 kv_region=False)
    plan = planning.make_plan(problem.params, q_tile, kv_tile)
    assert {fused_triton.walk_masking(plan, kind, kernel)
            for kind, kernel in (("kv", "forward"), ("kv", "dq"), ("q", "dkv"))} == {forced}
    q64, k64, v64 = (f64(x) for x in (inp.q, inp.k, inp.v))
    want_out, want_lse = oracle.na(q64, k64, v64, **cfg.na_kwargs())
    want_grads = oracle.na_bwd(q64, k64, v64, f64(inp.dout), f64(inp.dlse), **cfg.na_kwargs())[:3]
    (out, lse), vjp = jax.vjp(lambda q, k, v: fused_triton.attention(q, k, v, problem, config),
                              inp.q, inp.k, inp.v)
    assert oracle.rel_l2(f64(out), want_out) < 1e-5
    assert np.max(np.abs(f64(lse) - want_lse)) < 1e-4
    for got, want, what in zip(vjp((inp.dout, inp.dlse)), want_grads, "qkv"):
        assert oracle.rel_l2(f64(got), want) < 1e-4, "d" + what
