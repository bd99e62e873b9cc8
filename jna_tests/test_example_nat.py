"""The NAT/DiNAT classifier example (``examples/nat_classifier``): it trains (the loss falls on
synthetic data within a few dozen steps, through the command line), its dense-attention variant
computes what neighborhood attention with a window as large as the map computes (the same
parameters, relative positional bias included), and its .npz loader checks what it reads.

Needs optax (the ``test`` and ``examples`` extras).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("optax", reason="the example trains with optax (pip install -e '.[test]')")

from examples.nat_classifier import model as nat_model  # noqa: E402
from examples.nat_classifier import train as nat_train  # noqa: E402
from jna_tests.common import assert_abs  # noqa: E402

TINY = ["--steps", "30", "--batch", "16", "--image-size", "16", "--embed-dim", "16",
        "--depths", "1,1", "--heads", "2,2", "--kernel-size", "3", "--num-classes", "4",
        "--log-every", "10", "--backend", "reference"]


def test_tiny_model_learns_synthetic_data(capsys):
    """30 steps of a two-stage NAT with relative positional bias on jna's reference backend,
    through the command line: the mean loss of the last 5 steps is under half that of the first
    5; the run ends with a JSON summary line."""
    result = nat_train.main(TINY)
    losses = result["losses"]
    assert len(losses) == 30 and all(np.isfinite(losses))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.5 * first, (first, last, losses)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["attention"] == "na" and summary["rel_pos_bias"] is True
    assert summary["backend"] == "reference" and summary["ms_per_step"] > 0
    assert "rpb" in result["params"]["params"]["stage0_block0"]["attn"]


def test_flags_reach_the_model():
    cfg = nat_train.parse_args(["--attention", "dense", "--no-rpb", "--dense-implementation", "xla",
                                "--no-dilation", "--dtype", "bfloat16", "--depths", "1,2,1",
                                "--heads", "1,2,4", "--backend", "fused-triton"])
    model = cfg.model()
    assert (model.attention, model.rel_pos_bias, model.dense_implementation, model.dilated) == (
        "dense", False, "xla", False)
    assert model.depths == (1, 2, 1) and model.num_heads == (1, 2, 4)
    assert model.backend == "fused-triton" and model.dtype == jnp.bfloat16
    assert nat_train.parse_args([]).rel_pos_bias is True


def test_dense_variant_equals_neighborhood_attention_over_the_whole_map():
    """`DenseAttention2D` (the ``--attention dense`` layer) on the parameters of a
    `jna.nn.NeighborhoodAttention2D` whose window is the whole (non-square) map, bias included,
    gives that layer's output: the dense runs compare attention implementations, not models.
    The classifiers share the parameter tree too."""
    import jna.nn

    x = jax.random.normal(jax.random.key(0), (2, 5, 7, 8))
    na = jna.nn.NeighborhoodAttention2D(num_heads=2, kernel_size=(5, 7), rel_pos_bias=True,
                                        backend="reference")
    dense = nat_model.DenseAttention2D(num_heads=2)
    with jax.default_matmul_precision("highest"):
        params = jax.jit(na.init)(jax.random.key(1, impl="rbg"), x)
        params["params"]["rpb"] = jax.random.normal(jax.random.key(2), params["params"]["rpb"].shape)
        assert jax.tree.structure(jax.eval_shape(dense.init, jax.random.key(1), x)) == \
            jax.tree.structure(params)
        want = jax.jit(na.apply)(params, x)
        got = jax.jit(dense.apply)(params, x)
    assert_abs(got, want, 1e-4, "dense vs NA(kernel = map)")
    kwargs = dict(num_classes=3, embed_dim=8, depths=(1, 1), num_heads=(2, 2), kernel_size=64,
                  dilated=False)
    images = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    trees = [jax.tree.structure(jax.eval_shape(
        nat_model.NATClassifier(**kwargs, attention=a).init, jax.random.key(0), images))
        for a in ("na", "dense")]
    assert trees[0] == trees[1]


def test_npz_loader(tmp_path):
    good = tmp_path / "good.npz"
    images = np.random.default_rng(0).integers(0, 255, (5, 8, 8, 3), dtype=np.uint8)
    np.savez(good, images=images, labels=np.arange(5))
    x, y = nat_train.load_npz(str(good))
    assert x.shape == (5, 8, 8, 3) and x.dtype == np.float32 and abs(float(x.mean())) < 1e-5
    assert y.dtype == np.int32 and list(y) == [0, 1, 2, 3, 4]
    for name, arrays in {"missing": dict(images=images), "shape": dict(images=images[..., 0],
                                                                       labels=np.arange(5))}.items():
        bad = tmp_path / f"{name}.npz"
        np.savez(bad, **arrays)
        with pytest.raises(ValueError, match="images"):
            nat_train.load_npz(str(bad))
