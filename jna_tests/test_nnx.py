"""Flax NNX modules `jna.nnx.NeighborhoodAttention1D/2D/3D`.

The NNX layer is checked against the linen layer (`jna.nn`, itself checked against a float64
hand computation in ``test_modules.py``): with the NNX module's weights copied into linen params,
both give identical outputs and gradients. Then the NNX-specific parts: parameter layout,
initializers, dropout modes and rngs, nnx.jit / nnx.grad.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jna.nn
import jna.nnx
from jna_tests.common import assert_abs, assert_names, layer_classes

LINEN, NNX = layer_classes("linen"), layer_classes("nnx")
C = 16
# (rank, rel_pos_bias) -> (input spatial shape, module kwargs); the bias needs non-causal stride 1.
SETUPS = {
    (1, False): ((15,), dict(num_heads=2, kernel_size=5, stride=2, dilation=2, is_causal=True)),
    (2, False): ((6, 7), dict(num_heads=4, kernel_size=(3, 4), stride=(1, 2),
                              is_causal=(False, True), qk_scale=0.3)),
    (3, False): ((4, 5, 3), dict(num_heads=2, kernel_size=(2, 3, 3), dilation=(2, 1, 1),
                                 qkv_bias=False)),
    (1, True): ((11,), dict(num_heads=2, kernel_size=5, dilation=2)),
    (2, True): ((6, 7), dict(num_heads=4, kernel_size=(3, 4), qk_scale=0.3)),
    (3, True): ((4, 5, 3), dict(num_heads=2, kernel_size=(2, 3, 3), dilation=(2, 1, 1),
                                qkv_bias=False)),
}


@pytest.fixture(autouse=True)
def _exact_float32_matmuls():
    """Full float32 matmuls on a GPU too (TF32 would differ between the compared programs)."""
    with jax.default_matmul_precision("highest"):
        yield


def _setup(rank, rel_pos_bias=False, seed=0, keep_rngs=True, **overrides):
    """An NNX layer (random weights, rpb made large enough to matter), its linen twin with the
    same weights as params, and an input ``[2, *X, C]``."""
    shape, kwargs = SETUPS[rank, rel_pos_bias]
    kwargs = {"backend": "reference", **kwargs, "rel_pos_bias": rel_pos_bias, **overrides}
    layer = NNX[rank](in_features=C, **kwargs, keep_rngs=keep_rngs, rngs=nnx.Rngs(seed))
    if rel_pos_bias:
        layer.rpb.set_value(jax.random.normal(jax.random.key(seed + 1), layer.rpb.shape))
    linen = LINEN[rank](**kwargs)
    params = {"params": nnx.to_pure_dict(nnx.state(layer, nnx.Param))}
    x = jax.random.normal(jax.random.key(seed + 2), (2, *shape, C), jnp.float32)
    return layer, linen, params, x


@pytest.mark.parametrize("rel_pos_bias", [False, True])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_same_params_and_outputs_as_linen(rank, rel_pos_bias):
    """The NNX layer's params have the linen layer's tree and shapes, and on the same weights
    both give the same output (eager and jitted)."""
    layer, linen, params, x = _setup(rank, rel_pos_bias, seed=rank)
    shapes = lambda tree: jax.tree.map(jnp.shape, tree)
    assert shapes(params) == shapes(linen.init(jax.random.key(0), x))
    want = linen.apply(params, x)
    np.testing.assert_array_equal(layer(x), want)
    assert_abs(nnx.jit(lambda m, x: m(x))(layer, x), want, 1e-6, "nnx.jit out")


@pytest.mark.parametrize("rel_pos_bias", [False, True])
def test_grads_match_linen(rel_pos_bias):
    """nnx.grad wrt the layer's params (incl. rpb) and jax.grad wrt x equal linen's."""
    layer, linen, params, x = _setup(2, rel_pos_bias, seed=3)
    dy = jax.random.normal(jax.random.key(4), x.shape)

    @nnx.jit
    def nnx_grads(layer, x):
        return nnx.grad(lambda m, x: jnp.sum(m(x) * dy), argnums=(0, 1))(layer, x)

    g_layer, g_x = nnx_grads(layer, x)
    want_params, want_x = jax.jit(jax.grad(lambda p, x: jnp.sum(linen.apply(p, x) * dy),
                                           argnums=(0, 1)))(params, x)
    got = nnx.to_pure_dict(g_layer)
    assert jax.tree.structure(got) == jax.tree.structure(want_params["params"])
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want_params)):
        assert_abs(g, w, 1e-5, f"d{jax.tree_util.keystr(path)}")
    assert_abs(g_x, want_x, 1e-5, "dx")


def test_split_merge_and_fused_triton():
    """Split/merge round-trips the layer; backend="fused-triton" (interpreted on CPU) gives the
    reference backend's output."""
    layer, _, _, x = _setup(1, seed=6)
    graphdef, state = nnx.split(layer)
    out = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))(state, x)
    assert_abs(out, layer(x), 1e-6, "split/merge out")
    shape, kwargs = SETUPS[1, False]
    triton = NNX[1](in_features=C, **{**kwargs, "backend": "fused-triton"}, rngs=nnx.Rngs(0))
    nnx.update(triton, nnx.state(layer, nnx.Param))
    assert_abs(triton(x), layer(x), 1e-4, "fused-triton out")


@pytest.mark.parametrize("rank", [1, 3])
def test_param_layout(rank):
    """qkv: Linear C -> 3C (bias iff qkv_bias), proj: Linear C -> C, rpb [heads, 2K-1, ...]
    iff rel_pos_bias (None otherwise)."""
    layer, _, _, _ = _setup(rank, rel_pos_bias=True)
    _, kwargs = SETUPS[rank, True]
    ks = kwargs["kernel_size"]
    ks = ks if isinstance(ks, tuple) else (ks,) * rank
    assert layer.qkv.kernel.shape == (C, 3 * C) and layer.proj.kernel.shape == (C, C)
    assert layer.proj.bias.shape == (C,)
    assert (layer.qkv.bias is None) == (not kwargs.get("qkv_bias", True))
    assert layer.rpb.shape == (kwargs["num_heads"], *(2 * k - 1 for k in ks))
    plain, _, _, _ = _setup(rank)
    assert plain.rpb is None


def test_initializers():
    """kernel_init / bias_init initialize both projections, rpb_init the table; defaults are
    flax's (LeCun normal kernels, zero biases) and NATTEN's truncated normal (std 0.02)."""
    layer = jna.nnx.NeighborhoodAttention1D(
        2, C, 3, rel_pos_bias=True, kernel_init=nn.initializers.constant(0.5),
        bias_init=nn.initializers.ones_init(), rpb_init=nn.initializers.constant(-1.0),
        rngs=nnx.Rngs(0))
    for lin in (layer.qkv, layer.proj):
        np.testing.assert_array_equal(lin.kernel[...], np.full(lin.kernel.shape, 0.5))
        np.testing.assert_array_equal(lin.bias[...], np.ones(lin.bias.shape))
    np.testing.assert_array_equal(layer.rpb[...], -np.ones((2, 5)))
    default = jna.nnx.NeighborhoodAttention1D(2, C, 3, rel_pos_bias=True, rngs=nnx.Rngs(0))
    assert not np.any(default.qkv.bias[...]) and not np.any(default.proj.bias[...])
    std = float(jnp.std(default.qkv.kernel[...]))  # LeCun normal: std = fan_in ** -0.5
    assert 0.85 < std * C ** 0.5 < 1.15, std
    assert 0.005 < float(jnp.std(default.rpb[...])) < 0.04
    half = jna.nnx.NeighborhoodAttention1D(2, C, 3, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(nnx.state(half, nnx.Param)))


def test_dropout_mode_is_required_with_dropout():
    """As flax.nnx.MultiHeadAttention: with proj_drop > 0 and no mode (call or attribute) the
    call is a ValueError naming deterministic; proj_drop == 0 needs none."""
    layer, _, _, x = _setup(2, proj_drop=0.5)
    with pytest.raises(ValueError) as e:
        layer(x)
    assert_names(e.value, "deterministic")
    plain, _, _, _ = _setup(2)
    plain(x)


def test_dropout_modes_and_rngs():
    """deterministic=True is the plain output; False zeroes about half the outputs and doubles
    the rest, with the stored rngs (advancing: a second call draws another mask) or the call's;
    the call's mode overrides the attribute; .eval()/.train() and nnx.view set the mode."""
    layer, _, _, x = _setup(2, proj_drop=0.5, seed=5)
    want = np.asarray(layer(x, deterministic=True))
    first = np.asarray(layer(x, deterministic=False))
    dropped = first == 0
    assert 0.3 < dropped.mean() < 0.7, dropped.mean()
    assert_abs(first[~dropped], 2.0 * want[~dropped], 1e-5, "kept outputs (x2)")
    assert np.any((np.asarray(layer(x, deterministic=False)) == 0) != dropped)
    key_out = layer(x, deterministic=False, rngs=nnx.Rngs(dropout=7))
    np.testing.assert_array_equal(key_out, layer(x, deterministic=False, rngs=nnx.Rngs(dropout=7)))

    layer.eval()
    np.testing.assert_array_equal(layer(x), want)
    assert np.any(np.asarray(layer(x, deterministic=False)) == 0)  # the call wins
    layer.train()
    assert np.any(np.asarray(layer(x)) == 0)
    np.testing.assert_array_equal(nnx.view(layer, deterministic=True)(x), want)

    fixed = jna.nnx.NeighborhoodAttention2D(in_features=C, **SETUPS[2, False][1], proj_drop=0.5,
                                            deterministic=True, rngs=nnx.Rngs(0))
    fixed(x)  # the mode from the constructor


def test_dropout_without_kept_rngs():
    """keep_rngs=False stores no rng: dropout then needs rngs at call time (ValueError naming
    rngs without them), and jits through nnx.jit with the Rngs as an argument."""
    layer, _, _, x = _setup(2, proj_drop=0.5, keep_rngs=False)
    with pytest.raises(ValueError) as e:
        layer(x, deterministic=False)
    assert_names(e.value, "rngs")
    out = nnx.jit(lambda m, x, r: m(x, deterministic=False, rngs=r))(layer, x, nnx.Rngs(dropout=1))
    assert 0.3 < float(jnp.mean(out == 0)) < 0.7


def test_bad_arguments():
    """in_features % num_heads, proj_drop outside [0, 1] and an input of the wrong channels or
    rank are ValueErrors naming the argument."""
    with pytest.raises(ValueError) as e:
        jna.nnx.NeighborhoodAttention2D(3, C, 3, rngs=nnx.Rngs(0))
    assert_names(e.value, "num_heads")
    with pytest.raises(ValueError) as e:
        jna.nnx.NeighborhoodAttention2D(2, C, 3, proj_drop=-0.1, rngs=nnx.Rngs(0))
    assert_names(e.value, "proj_drop")
    layer = jna.nnx.NeighborhoodAttention2D(2, C, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError) as e:
        layer(jnp.zeros((1, 6, 6, 8)))
    assert_names(e.value, "in_features")
    with pytest.raises(ValueError) as e:
        layer(jnp.zeros((1, 6, C)))
    assert_names(e.value, "x")
