"""`jna.natten_weights`: NATTEN PyTorch state dicts -> jna linen params / NNX layers.

The weights are random numpy arrays laid out exactly as NATTEN's ``NeighborhoodAttention{1,2,3}D``
state dict lays them out (torch Linear ``[out, in]``; no torch needed). The converted jna layers
(linen and NNX, float32, reference backend) are compared with a float64 numpy computation of
NATTEN's module forward, written here from the raw torch-layout arrays (not through the
converter), with the window mask from the independent oracle (`jna_tests.oracle.na_mask`):

    qkv = x @ W_qkv.T + b_qkv -> [B, *X, 3, heads, head_dim] -> q * scale, k, v
    logits = q . k + rpb[h, (y'_i - x'_i) + K_i - 1 per axis]   (x' = x // dilation)
    out = softmax over the window . v -> [B, *X, C] -> @ W_proj.T + b_proj
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jna.natten_weights import linen_params_from_natten, load_natten_into_nnx
from jna_tests import oracle
from jna_tests.common import assert_abs, assert_names, layer_classes

LINEN, NNX = layer_classes("linen"), layer_classes("nnx")
C = 16

# name -> (spatial shape, layer kwargs, key prefix): NAT (2-D, bias), DiNAT (1-D dilated, bias),
# 3-D with bias and no qkv bias, and NATTEN >= 0.20 style (no bias; causal, strided).
CASES = {
    "nat_2d": ((7, 8), dict(num_heads=4, kernel_size=3, rel_pos_bias=True), ""),
    "dinat_1d": ((13,), dict(num_heads=2, kernel_size=5, dilation=2, rel_pos_bias=True,
                             qk_scale=0.2), "levels.1.blocks.0.attn."),
    "3d": ((6, 5, 3), dict(num_heads=2, kernel_size=(3, 3, 2), dilation=(2, 1, 1),
                           rel_pos_bias=True, qkv_bias=False), "attn."),
    "2d_causal_strided": ((6, 7), dict(num_heads=4, kernel_size=(3, 4), stride=(1, 2),
                                       is_causal=(False, True)), ""),
}


@pytest.fixture(autouse=True)
def _exact_float32_matmuls():
    """Compared with float64 at 1e-4: no TF32 matmuls on a GPU."""
    with jax.default_matmul_precision("highest"):
        yield


def natten_state_dict(rank, kwargs, prefix="", seed=0):
    """Random float32 weights with NATTEN's names and layout (a large rpb, so it matters)."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape, std=1.0: (std * rng.standard_normal(shape)).astype(np.float32)
    sd = {"qkv.weight": normal(3 * C, C, std=C ** -0.5),
          "proj.weight": normal(C, C, std=C ** -0.5), "proj.bias": normal(C, std=0.1)}
    if kwargs.get("qkv_bias", True):
        sd["qkv.bias"] = normal(3 * C, std=0.1)
    if kwargs.get("rel_pos_bias", False):
        ks = oracle.per_axis(kwargs["kernel_size"], rank)
        sd["rpb"] = normal(kwargs["num_heads"], *(2 * k - 1 for k in ks))
    return {prefix + name: value for name, value in sd.items()}


def natten_forward(sd, x, kwargs):
    """NATTEN's module forward in float64 from the raw torch-layout arrays ``sd``."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    x = np.asarray(x, np.float64)
    b, spatial, rank = x.shape[0], x.shape[1:-1], x.ndim - 2
    heads = kwargs["num_heads"]
    dim = C // heads
    qkv = x @ sd["qkv.weight"].T + sd.get("qkv.bias", 0.0)
    qkv = qkv.reshape(b, -1, 3, heads, dim)  # tokens row-major
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = q * (kwargs.get("qk_scale") or dim ** -0.5)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k)
    ks = oracle.per_axis(kwargs["kernel_size"], rank)
    dl = oracle.per_axis(kwargs.get("dilation", 1), rank)
    mask = oracle.na_mask(spatial, ks, kwargs.get("stride", 1), dl, kwargs.get("is_causal", False))
    if "rpb" in sd:
        coords = np.indices(spatial).reshape(rank, -1)  # [rank, N]
        # Per axis: (key - query) in dilation-group coordinates + K - 1; clipped only where masked.
        index = tuple(np.clip(coords[a][None, :] // dl[a] - coords[a][:, None] // dl[a] + ks[a] - 1,
                              0, 2 * ks[a] - 2) for a in range(rank))
        logits = logits + sd["rpb"][(slice(None), *index)][None]  # [1, H, N, N]
    logits = np.where(mask[None, None], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, *spatial, C)
    return out @ sd["proj.weight"].T + sd["proj.bias"]


def _case(name, seed=0):
    shape, kwargs, prefix = CASES[name]
    rank = len(shape)
    sd = natten_state_dict(rank, kwargs, prefix, seed)
    x = np.random.default_rng(seed + 1).standard_normal((2, *shape, C)).astype(np.float32)
    return rank, {**kwargs, "backend": "reference"}, prefix, sd, x


@pytest.mark.parametrize("name", list(CASES))
def test_converted_layers_match_natten_forward(name):
    """linen (converted params) and NNX (loaded weights) outputs equal NATTEN's module forward
    computed in float64 from the same state dict; keys outside the prefix are ignored."""
    rank, kwargs, prefix, sd, x = _case(name)
    want = natten_forward({k[len(prefix):]: v for k, v in sd.items()}, x, kwargs)
    if prefix:
        sd = {**sd, "norm1.weight": np.ones(C), "mlp.fc1.weight": np.zeros((4 * C, C))}
    linen = LINEN[rank](**kwargs)
    params = linen_params_from_natten(sd, linen, prefix=prefix)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, linen.init(jax.random.key(0), x))
    assert_abs(linen.apply(params, x), want, 1e-4, f"linen {name}")
    layer = load_natten_into_nnx(NNX[rank](in_features=C, **kwargs, rngs=nnx.Rngs(0)), sd, prefix=prefix)
    assert_abs(layer(x), want, 1e-4, f"nnx {name}")


def test_without_module_and_dtypes():
    """Without a module the weights convert on their own (num_heads checked against rpb);
    param_dtype sets the arrays' dtype, a bfloat16 NNX layer keeps its bfloat16 params; values
    with a torch-like ``.detach().cpu()`` are accepted."""
    rank, kwargs, prefix, sd, x = _case("nat_2d")

    class FakeTensor:  # what the converter needs of a torch tensor
        def __init__(self, a):
            self.a = a

        def detach(self):
            return self

        def cpu(self):
            return self

        def __array__(self, dtype=None, copy=None):
            return self.a if dtype is None else self.a.astype(dtype)

    params = linen_params_from_natten({k: FakeTensor(v) for k, v in sd.items()}, num_heads=4)
    np.testing.assert_array_equal(params["params"]["qkv"]["kernel"], sd["qkv.weight"].T)
    np.testing.assert_array_equal(params["params"]["rpb"], sd["rpb"])
    assert_abs(LINEN[rank](**kwargs).apply(params, x), natten_forward(sd, x, kwargs), 1e-4, "out")
    half = linen_params_from_natten(sd, param_dtype=jnp.bfloat16)
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(half))
    layer = NNX[rank](in_features=C, **kwargs, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    load_natten_into_nnx(layer, sd)
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(nnx.state(layer, nnx.Param)))
    with pytest.raises(ValueError) as e:
        linen_params_from_natten(sd, num_heads=2)  # rpb has 4 heads
    assert_names(e.value, "rpb")


def _error(call, *names):
    with pytest.raises(ValueError) as e:
        call()
    for name in names:
        assert name in str(e.value), f"{name!r} not in {str(e.value)!r}"
    return str(e.value)


def test_bad_state_dicts_name_the_key():
    """Missing, unexpected and misshapen arrays are ValueErrors naming the (prefixed) key and,
    for shapes, the expected and found shapes; a failed NNX load leaves the layer unchanged."""
    rank, kwargs, prefix, sd, x = _case("dinat_1d")  # prefix "levels.1.blocks.0.attn."
    linen = LINEN[rank](**kwargs)
    convert = lambda d, module=linen: lambda: linen_params_from_natten(d, module, prefix=prefix)
    drop = lambda name: {k: v for k, v in sd.items() if k != prefix + name}
    _error(convert(drop("proj.bias")), prefix + "proj.bias")
    _error(convert({**sd, prefix + "qkv.weight": sd[prefix + "qkv.weight"].T}),
           prefix + "qkv.weight", "(48, 16)", "(16, 48)")
    _error(convert({**sd, prefix + "proj.bias": np.zeros(C + 1)}), prefix + "proj.bias", "(17,)")
    _error(convert({**sd, prefix + "rpb": np.zeros((2, 7))}), prefix + "rpb", "(2, 9)", "(2, 7)")
    _error(convert({**sd, prefix + "relative_position_bias": np.zeros(3)}),
           prefix + "relative_position_bias")
    # rpb and qkv.bias must match the module's rel_pos_bias / qkv_bias, both ways.
    _error(convert(drop("rpb")), prefix + "rpb", "rel_pos_bias=True")
    _error(convert(sd, LINEN[rank](**{**kwargs, "rel_pos_bias": False})), prefix + "rpb")
    _error(convert(drop("qkv.bias")), prefix + "qkv.bias", "qkv_bias=True")
    _error(convert(sd, LINEN[rank](**{**kwargs, "qkv_bias": False})), prefix + "qkv.bias")
    _error(convert(sd, LINEN[rank](**{**kwargs, "num_heads": 3})), "num_heads")
    # A wrong prefix: the message names the missing keys and where such names are.
    _error(lambda: linen_params_from_natten(sd, linen, prefix="attn."), "'attn.qkv.weight'",
           f"'{prefix}qkv.weight'")

    layer = NNX[rank](in_features=2 * C, **kwargs, rngs=nnx.Rngs(0))
    _error(lambda: load_natten_into_nnx(layer, sd, prefix=prefix), prefix + "qkv.weight", "(96, 32)")
    layer = NNX[rank](in_features=C, **kwargs, rngs=nnx.Rngs(0))
    before = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
    _error(lambda: load_natten_into_nnx(layer, drop("rpb"), prefix=prefix), prefix + "rpb")
    after = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, after, before)
    with pytest.raises(TypeError):
        load_natten_into_nnx(linen, sd, prefix=prefix)
