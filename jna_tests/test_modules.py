"""Flax linen modules `jna.nn.NeighborhoodAttention1D/2D/3D`.

The output is checked against a hand-built float64 computation from the module's own params:
``x @ qkv.kernel + qkv.bias`` split as ``[..., 3, heads, head_dim]`` (NATTEN's layout) ->
oracle NA -> ``@ proj.kernel + proj.bias``. Gradients wrt params and input are checked against
the same chain differentiated by hand (the oracle's backward in the middle).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jna
from jna_tests import oracle
from jna_tests.backends import float32_backends, tiered
from jna_tests.common import assert_abs, assert_names, assert_rel_l2, f64


@pytest.fixture(autouse=True)
def _exact_float32_matmuls():
    """The Dense projections are compared with a float64 hand computation at 1e-4: on a GPU,
    float32 matmuls default to TF32 (about 1e-3 relative), so ask for full float32 here."""
    with jax.default_matmul_precision("highest"):
        yield


MODULES = {1: jna.nn.NeighborhoodAttention1D, 2: jna.nn.NeighborhoodAttention2D,
           3: jna.nn.NeighborhoodAttention3D}
# rank -> (input spatial shape, module kwargs)
SETUPS = {
    1: ((15,), dict(num_heads=2, kernel_size=5, stride=2, dilation=2, is_causal=True)),
    2: ((6, 7), dict(num_heads=4, kernel_size=(3, 4), stride=(1, 2), is_causal=(False, True),
                     qk_scale=0.3)),
    3: ((4, 5, 3), dict(num_heads=2, kernel_size=(2, 3, 3), dilation=(2, 1, 1),
                        qkv_bias=False)),
}
C = 16


def _setup(rank, seed=0, batch=2, **overrides):
    shape, kwargs = SETUPS[rank]
    kwargs = {**kwargs, **overrides}
    module = MODULES[rank](**kwargs)
    x = jax.random.normal(jax.random.key(seed), (batch, *shape, C), jnp.float32)
    # With dropout the mode must be given once (here or as a field), as in flax's attention.
    mode = {} if "deterministic" in kwargs else {"deterministic": True}
    params = module.init(jax.random.key(seed + 1), x, **mode)
    return module, kwargs, x, params


def _window(kwargs):
    return {k: kwargs[k] for k in ("kernel_size", "stride", "dilation", "is_causal") if k in kwargs}


def _hand_forward(params, x, kwargs):
    """float64 forward from the params; returns out and the intermediates for the backward."""
    p = jax.tree.map(f64, params["params"])
    x = f64(x)
    heads = kwargs["num_heads"]
    qkv = x @ p["qkv"]["kernel"] + p["qkv"].get("bias", 0.0)
    qkv = qkv.reshape(*x.shape[:-1], 3, heads, C // heads)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    scale = kwargs.get("qk_scale")
    attn, _ = oracle.na(q, k, v, **_window(kwargs), scale=scale)
    a = attn.reshape(*x.shape[:-1], C)
    out = a @ p["proj"]["kernel"] + p["proj"]["bias"]
    return out, (p, x, q, k, v, a, scale)


def _hand_backward(params, x, kwargs, dy):
    """Gradients of <out, dy> wrt params and x, by the chain rule in float64."""
    _, (p, x, q, k, v, a, scale) = _hand_forward(params, x, kwargs)
    dy = f64(dy)
    lead = x.shape[:-1]
    flat = lambda t: t.reshape(-1, t.shape[-1])
    grads = {"proj": {"kernel": flat(a).T @ flat(dy), "bias": flat(dy).sum(0)}}
    da = (dy @ p["proj"]["kernel"].T).reshape(*lead, kwargs["num_heads"], -1)
    dq, dk, dv, _, _ = oracle.na_bwd(q, k, v, da, np.zeros(da.shape[:-1]), **_window(kwargs),
                                     scale=scale)
    dqkv = np.stack([dq, dk, dv], axis=-3).reshape(*lead, 3 * C)
    grads["qkv"] = {"kernel": flat(x).T @ flat(dqkv)}
    if "bias" in p["qkv"]:
        grads["qkv"]["bias"] = flat(dqkv).sum(0)
    return grads, dqkv @ p["qkv"]["kernel"].T


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_params_and_output_shape(rank):
    """Params are a fused qkv Dense (C -> 3C, bias iff qkv_bias) and a proj Dense (C -> C);
    output has the input's shape; also exported as jna.NeighborhoodAttention{rank}D."""
    module, kwargs, x, params = _setup(rank)
    assert getattr(jna, f"NeighborhoodAttention{rank}D") is MODULES[rank]
    shapes = jax.tree.map(lambda a: a.shape, params["params"])
    want = {"qkv": {"kernel": (C, 3 * C)}, "proj": {"kernel": (C, C), "bias": (C,)}}
    if kwargs.get("qkv_bias", True):
        want["qkv"]["bias"] = (3 * C,)
    assert shapes == want
    assert module.apply(params, x).shape == x.shape


@pytest.mark.parametrize("backend", tiered(float32_backends()))
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_output_matches_hand_built_computation(rank, backend):
    """apply (eager and jitted) == qkv Dense -> oracle NA -> proj Dense, from the params."""
    module, kwargs, x, params = _setup(rank, seed=rank, backend=backend)
    want, _ = _hand_forward(params, x, kwargs)
    assert_abs(module.apply(params, x, deterministic=True), want, 1e-4, "module out")
    assert_abs(jax.jit(module.apply)(params, x), want, 1e-4, "jit(module.apply) out")


@pytest.mark.parametrize("backend", tiered(float32_backends()))
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_grads_wrt_params_and_input(rank, backend):
    """jax.grad of <out, dy> wrt params and x equals the hand-differentiated chain."""
    module, kwargs, x, params = _setup(rank, seed=10 + rank, backend=backend)
    dy = jax.random.normal(jax.random.key(99), x.shape, jnp.float32)
    loss = lambda prm, x: jnp.sum(module.apply(prm, x) * dy)
    g_params, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    want_params, want_x = _hand_backward(params, x, kwargs, dy)
    got = g_params["params"]
    assert jax.tree.structure(got) == jax.tree.structure(want_params)
    for path, w in jax.tree_util.tree_leaves_with_path(want_params):
        g = got
        for key in path:
            g = g[key.key]
        assert_abs(g, w, 1e-3, f"d{jax.tree_util.keystr(path)}")
    assert_abs(g_x, want_x, 1e-3, "dx")


def test_dropout_only_when_not_deterministic():
    """proj_drop: deterministic=True is the plain output; deterministic=False (with a dropout
    rng) zeroes some outputs and scales the rest by 1 / (1 - rate)."""
    module, kwargs, x, params = _setup(2, seed=5, proj_drop=0.5)
    want, _ = _hand_forward(params, x, kwargs)
    det = module.apply(params, x, deterministic=True)
    assert_abs(det, want, 1e-4, "deterministic out")
    train = np.asarray(module.apply(params, x, deterministic=False,
                                    rngs={"dropout": jax.random.key(7)}))
    dropped = train == 0
    assert 0.3 < dropped.mean() < 0.7, dropped.mean()
    assert_abs(train[~dropped], 2.0 * want[~dropped], 1e-4, "kept outputs (x2)")


def test_dropout_mode_is_required_with_dropout():
    """As flax's attention (`merge_param`): with proj_drop > 0 the mode must be given exactly
    once, as the field or at call time (ValueError naming deterministic otherwise); with
    proj_drop == 0 none is needed."""
    module, kwargs, x, params = _setup(2, seed=5, proj_drop=0.5)
    for call in (lambda: module.apply(params, x), lambda: module.init(jax.random.key(0), x)):
        with pytest.raises(ValueError) as e:
            call()
        assert_names(e.value, "deterministic")
    fixed = MODULES[2](**kwargs, deterministic=True)
    with pytest.raises(ValueError) as e:
        fixed.apply(params, x, deterministic=False)
    assert_names(e.value, "deterministic")
    module0, _, x0, params0 = _setup(2, seed=5)
    module0.apply(params0, x0)  # proj_drop == 0: no mode needed


def test_deterministic_field():
    """deterministic=True as a field is the plain output; deterministic=False as a field drops
    (with a 'dropout' rng) the same outputs as deterministic=False at call time."""
    module, kwargs, x, params = _setup(2, seed=5, proj_drop=0.5)
    want, _ = _hand_forward(params, x, kwargs)
    assert_abs(MODULES[2](**kwargs, deterministic=True).apply(params, x), want, 1e-4, "eval out")
    rngs = {"dropout": jax.random.key(7)}
    train = MODULES[2](**kwargs, deterministic=False).apply(params, x, rngs=rngs)
    np.testing.assert_array_equal(train, module.apply(params, x, deterministic=False, rngs=rngs))


def test_proj_drop_out_of_range():
    """proj_drop outside [0, 1] is a ValueError naming proj_drop."""
    module = jna.nn.NeighborhoodAttention1D(num_heads=2, kernel_size=3, proj_drop=1.5)
    with pytest.raises(ValueError) as e:
        module.init(jax.random.key(0), jnp.zeros((1, 8, 8)), deterministic=True)
    assert_names(e.value, "proj_drop")


def test_initializers_are_fields():
    """kernel_init / bias_init initialize both projections; rpb_init the bias table. Defaults:
    flax's LeCun normal kernels, zero biases."""
    x = jnp.zeros((1, 8, 8))
    module = jna.nn.NeighborhoodAttention1D(
        num_heads=2, kernel_size=3, rel_pos_bias=True, kernel_init=nn.initializers.constant(0.5),
        bias_init=nn.initializers.ones_init(), rpb_init=nn.initializers.constant(-1.0))
    p = module.init(jax.random.key(0), x)["params"]
    for name in ("qkv", "proj"):
        np.testing.assert_array_equal(p[name]["kernel"], np.full(p[name]["kernel"].shape, 0.5))
        np.testing.assert_array_equal(p[name]["bias"], np.ones(p[name]["bias"].shape))
    np.testing.assert_array_equal(p["rpb"], -np.ones((2, 5)))
    default = jna.nn.NeighborhoodAttention1D(num_heads=2, kernel_size=3).init(jax.random.key(0), x)
    default = default["params"]
    assert not np.any(default["proj"]["bias"]) and not np.any(default["qkv"]["bias"])
    std = float(jnp.std(default["qkv"]["kernel"]))  # LeCun normal: std = fan_in ** -0.5
    assert 0.75 < std * 8 ** 0.5 < 1.25, std


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_bfloat16_dtype(rank):
    """dtype=bfloat16 computes in bf16 (bf16 output, float32 params) close to the float64
    chain; param_dtype=bfloat16 makes bf16 params."""
    module, kwargs, x, params = _setup(rank, seed=20 + rank, dtype=jnp.bfloat16)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))
    out = module.apply(params, x)
    assert out.dtype == jnp.bfloat16
    want, _ = _hand_forward(params, x, kwargs)
    assert_rel_l2(out, want, 2e-2, "bf16 module out")
    module16 = MODULES[rank](**{**kwargs, "param_dtype": jnp.bfloat16})
    params16 = module16.init(jax.random.key(0), x)
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(params16))
    assert module16.apply(params16, x).dtype == jnp.bfloat16


def test_channels_not_divisible_by_heads():
    """C % num_heads != 0 is a ValueError naming num_heads."""
    module = jna.nn.NeighborhoodAttention2D(num_heads=3, kernel_size=3)
    with pytest.raises(ValueError) as e:
        module.init(jax.random.key(0), jnp.zeros((1, 6, 6, 16)))
    assert_names(e.value, "num_heads")


def test_wrong_input_rank():
    """A 1-D input to the 2-D module is a ValueError naming x."""
    module = jna.nn.NeighborhoodAttention2D(num_heads=2, kernel_size=3)
    with pytest.raises(ValueError) as e:
        module.init(jax.random.key(0), jnp.zeros((1, 6, 16)))
    assert_names(e.value, "x")
