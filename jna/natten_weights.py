"""Load NATTEN's PyTorch neighborhood-attention weights into jna's linen and NNX modules.

NATTEN's ``NeighborhoodAttention1D/2D/3D`` modules (NAT/DiNAT layers; ``C`` channels, ``K`` the
kernel size per axis) have the state dict::

    qkv.weight  [3C, C]                        (torch Linear: [out, in])
    qkv.bias    [3C]                           (qkv_bias=True)
    proj.weight [C, C]
    proj.bias   [C]
    rpb         [heads, 2K_1 - 1, ..., 2K_n - 1] (NATTEN 0.17's rel_pos_bias / bias=True)

A flax Dense kernel is ``[in, out]``, so the weights are transposed; nothing else moves: NATTEN
and jna both split the qkv output as ``[..., 3, heads, head_dim]`` and index the bias table the
same way. Inside a model (e.g. a NAT block's ``attn``), pass the key ``prefix`` (``"attn."``,
``"levels.0.blocks.1.attn."``); keys outside the prefix are ignored.

Values may be numpy arrays or anything ``np.asarray`` takes; torch tensors are detached and moved
to the CPU first (torch's bfloat16 has no numpy dtype: convert those with ``.float()``).

Example::

    sd = {k: v.numpy() for k, v in natten_layer.state_dict().items()}
    layer = jna.nn.NeighborhoodAttention2D(num_heads=4, kernel_size=7, rel_pos_bias=True)
    params = linen_params_from_natten(sd, layer)                     # layer.apply(params, x)
    nnx_layer = load_natten_into_nnx(jna.nnx.NeighborhoodAttention2D(
        4, 64, 7, rel_pos_bias=True, rngs=nnx.Rngs(0)), sd)
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from jna import nn as linen_layers
from jna import nnx as nnx_layers
from jna._attention_layer import rpb_shape

__all__ = ["linen_params_from_natten", "load_natten_into_nnx", "NATTEN_KEYS"]

NATTEN_KEYS = ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "rpb")
_REQUIRED = ("qkv.weight", "proj.weight", "proj.bias")


@dataclasses.dataclass(frozen=True)
class _Expected:
    """What the target module fixes about the weights; None where it does not say."""

    num_heads: int | None = None
    in_features: int | None = None
    rpb_shape: tuple[int, ...] | None = None
    qkv_bias: bool | None = None
    rel_pos_bias: bool | None = None
    what: str = "the module"


def _expected_from(module) -> _Expected:
    """The expectations of a jna linen or NNX layer (TypeError for anything else)."""
    if not isinstance(module, (linen_layers._NeighborhoodAttention, nnx_layers._NeighborhoodAttention)):
        raise TypeError(
            f"module must be a jna.nn or jna.nnx NeighborhoodAttention1D/2D/3D, got "
            f"{type(module).__name__}."
        )
    return _Expected(
        num_heads=module.num_heads,
        in_features=getattr(module, "in_features", None),  # linen infers it from the input
        rpb_shape=rpb_shape(module.num_heads, module.kernel_size, module.rank) if module.rel_pos_bias else None,
        qkv_bias=module.qkv_bias,
        rel_pos_bias=module.rel_pos_bias,
        what=f"the {type(module).__name__} (qkv_bias={module.qkv_bias}, rel_pos_bias={module.rel_pos_bias})",
    )


def _as_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu()
    return np.asarray(value)


def _read(state_dict: Mapping[str, Any], prefix: str) -> dict[str, np.ndarray]:
    """The module's arrays by NATTEN name (prefix stripped); ValueError on unknown/missing keys."""
    own = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    unexpected = sorted(prefix + name for name in own if name not in NATTEN_KEYS)
    if unexpected:
        raise ValueError(
            f"state_dict has keys {unexpected} under prefix {prefix!r} that a NATTEN neighborhood "
            f"attention module does not have (expected {[prefix + k for k in NATTEN_KEYS]})."
        )
    missing = [name for name in _REQUIRED if name not in own]
    if missing:
        # Name where such keys are, if anywhere: the usual mistake is the prefix.
        elsewhere = sorted(key for key in state_dict if key.endswith(tuple("." + m for m in missing)))
        hint = f"; keys with these names: {elsewhere[:6]}" if elsewhere else ""
        raise ValueError(f"state_dict is missing {[prefix + m for m in missing]} (prefix "
                         f"{prefix!r}){hint}.")
    return {name: _as_numpy(value) for name, value in own.items()}


def _check_shape(key: str, array: np.ndarray, want: tuple, meaning: str) -> None:
    if tuple(array.shape) != tuple(want):
        raise ValueError(f"{key}: expected shape {tuple(want)} ({meaning}), found {tuple(array.shape)}.")


def _check_presence(key: str, present: bool, wanted: bool | None, expected: _Expected) -> None:
    if wanted is None or present == wanted:
        return
    if present:
        raise ValueError(f"state_dict has {key}, but {expected.what} has no such parameter.")
    raise ValueError(f"state_dict is missing {key}, which {expected.what} needs.")


def _channels(arrays: dict[str, np.ndarray]) -> int:
    """``C`` as most of ``qkv.weight [3C, C]``, ``proj.weight [C, C]``, ``proj.bias [C]`` say, so
    that the one odd array (e.g. a transposed weight) is the one the error names."""
    votes = [a.shape[i] for name, i in (("qkv.weight", 1), ("proj.weight", 0), ("proj.bias", 0))
             for a in [arrays[name]] if a.ndim > i]
    return collections.Counter(votes).most_common(1)[0][0] if votes else 0


def _flax_arrays(state_dict, prefix: str, expected: _Expected) -> dict[str, Any]:
    """Validated, transposed numpy arrays in the jna layout ``{'qkv': {...}, 'proj': {...}, 'rpb'}``."""
    arrays = _read(state_dict, prefix)
    key = lambda name: prefix + name
    w_qkv = arrays["qkv.weight"]
    channels = expected.in_features if expected.in_features is not None else _channels(arrays)
    _check_shape(key("qkv.weight"), w_qkv, (3 * channels, channels), f"[3C, C], C = {channels}")
    _check_shape(key("proj.weight"), arrays["proj.weight"], (channels, channels), f"[C, C], C = {channels}")
    _check_shape(key("proj.bias"), arrays["proj.bias"], (channels,), f"[C], C = {channels}")
    _check_presence(key("qkv.bias"), "qkv.bias" in arrays, expected.qkv_bias, expected)
    _check_presence(key("rpb"), "rpb" in arrays, expected.rel_pos_bias, expected)
    if expected.num_heads is not None and channels % expected.num_heads != 0:
        raise ValueError(f"the weights' channels ({channels}) must be divisible by num_heads "
                         f"({expected.num_heads}).")

    out = {"qkv": {"kernel": w_qkv.T},
           "proj": {"kernel": arrays["proj.weight"].T, "bias": arrays["proj.bias"]}}
    if "qkv.bias" in arrays:
        _check_shape(key("qkv.bias"), arrays["qkv.bias"], (3 * channels,), f"[3C], C = {channels}")
        out["qkv"]["bias"] = arrays["qkv.bias"]
    if "rpb" in arrays:
        rpb = arrays["rpb"]
        if expected.rpb_shape is not None:
            _check_shape(key("rpb"), rpb, expected.rpb_shape, "[num_heads, 2*kernel_size - 1 per axis]")
        elif not (2 <= rpb.ndim <= 4 and all(n % 2 == 1 for n in rpb.shape[1:])
                  and (expected.num_heads is None or rpb.shape[0] == expected.num_heads)):
            heads = "num_heads" if expected.num_heads is None else expected.num_heads
            raise ValueError(f"{key('rpb')}: expected shape [{heads}, 2*kernel_size - 1 per axis] "
                             f"(1 to 3 odd axes), found {tuple(rpb.shape)}.")
        out["rpb"] = rpb
    return out


def linen_params_from_natten(state_dict: Mapping[str, Any], module=None, *, prefix: str = "",
                             num_heads: int | None = None, param_dtype=None) -> dict:
    """Variables for a `jna.nn` layer from a NATTEN module's state dict.

    Args:
      state_dict: name -> array in NATTEN's layout (module docstring), e.g.
        ``{k: v.numpy() for k, v in natten_layer.state_dict().items()}``.
      module: the `jna.nn.NeighborhoodAttention1D/2D/3D` the weights are for. When given, its
        ``qkv_bias``, ``rel_pos_bias``, ``num_heads`` and ``kernel_size`` are checked against the
        weights (a missing or unexpected ``qkv.bias``/``rpb`` is an error). Without it, the weights
        are only checked for consistency with each other (and ``num_heads`` if given).
      prefix: key prefix of the attention module inside a larger state dict, e.g. ``"attn."``.
      num_heads: checked against ``rpb``'s first axis and the channels when ``module`` is None.
      param_dtype: dtype of the returned arrays; default ``module.param_dtype`` or float32.

    Returns:
      ``{'params': {'qkv': {'kernel': [C, 3C], 'bias': [3C]}, 'proj': {'kernel': [C, C],
      'bias': [C]}, 'rpb': [heads, 2K_1 - 1, ...]}}`` (bias and rpb when present), for
      ``module.apply``.

    Raises:
      ValueError: a missing/unexpected key, or an array of the wrong shape (naming the key and
        the expected vs found shape).
    """
    if module is not None:
        expected = _expected_from(module)
        if num_heads is not None and num_heads != module.num_heads:
            raise ValueError(f"num_heads={num_heads} disagrees with the module's num_heads={module.num_heads}.")
        if param_dtype is None:
            param_dtype = module.param_dtype
    else:
        expected = _Expected(num_heads=num_heads)
    dtype = jnp.float32 if param_dtype is None else param_dtype
    arrays = _flax_arrays(state_dict, prefix, expected)
    to_jax = lambda tree: {k: to_jax(v) if isinstance(v, dict) else jnp.asarray(v, dtype)
                           for k, v in tree.items()}
    return {"params": to_jax(arrays)}


def load_natten_into_nnx(module, state_dict: Mapping[str, Any], *, prefix: str = ""):
    """Sets a `jna.nnx` layer's parameters, in place, from a NATTEN module's state dict.

    Args:
      module: a `jna.nnx.NeighborhoodAttention1D/2D/3D`; its ``in_features``, ``num_heads``,
        ``kernel_size``, ``qkv_bias`` and ``rel_pos_bias`` must match the weights. Each parameter
        keeps its dtype (the module's ``param_dtype``).
      state_dict: name -> array in NATTEN's layout (module docstring).
      prefix: key prefix of the attention module inside a larger state dict, e.g. ``"attn."``.

    Returns:
      ``module``.

    Raises:
      TypeError: ``module`` is not a jna NNX layer.
      ValueError: a missing/unexpected key, or an array of the wrong shape (naming the key and
        the expected vs found shape).
    """
    if not isinstance(module, nnx_layers._NeighborhoodAttention):
        raise TypeError(f"module must be a jna.nnx NeighborhoodAttention1D/2D/3D, got {type(module).__name__}; "
                        f"for jna.nn (linen) layers use linen_params_from_natten.")
    arrays = _flax_arrays(state_dict, prefix, _expected_from(module))  # validates everything first
    targets = [(module.qkv.kernel, arrays["qkv"]["kernel"]), (module.proj.kernel, arrays["proj"]["kernel"]),
               (module.proj.bias, arrays["proj"]["bias"])]
    if module.qkv_bias:
        targets.append((module.qkv.bias, arrays["qkv"]["bias"]))
    if module.rel_pos_bias:
        targets.append((module.rpb, arrays["rpb"]))
    for param, value in targets:
        param.set_value(jnp.asarray(value, param.get_value().dtype))
    return module
