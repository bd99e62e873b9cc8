"""Train the NAT/DiNAT classifier (`examples.nat_classifier.model`) with optax.

    python -m examples.nat_classifier.train                       # synthetic data, jna, rpb on
    python -m examples.nat_classifier.train --attention dense     # same model, dense attention
    python -m examples.nat_classifier.train --no-rpb --backend fused-triton --dtype bfloat16

Run from the repository root (``pip install -e '.[examples]'`` brings optax). Data: synthetic by
default (`synthetic_templates`: one random smooth image per class plus noise, so the loss can
fall within a few dozen steps), or ``--data file.npz`` with ``images [N, S, S, C]`` (uint8 or
float) and integer ``labels [N]``. Every ``--log-every`` steps it prints the mean loss and
accuracy; at the end one JSON line with the settings, the final loss and the speed of the steps
after the first (compilation excluded): images/s and ms/step, for comparing attention backends
on one GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from examples.nat_classifier.model import NATClassifier

__all__ = ["TrainConfig", "synthetic_templates", "synthetic_batch", "train", "main"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one run needs (the command line's flags)."""

    steps: int = 300
    batch: int = 64
    image_size: int = 32
    channels: int = 3
    num_classes: int = 10
    embed_dim: int = 32
    depths: tuple[int, ...] = (2, 2)
    num_heads: tuple[int, ...] = (2, 4)
    kernel_size: int = 5
    dilated: bool = True
    rel_pos_bias: bool = True
    attention: str = "na"
    backend: str = "auto"
    dense_implementation: str | None = None
    dtype: str = "float32"
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 10
    noise: float = 1.0
    data: str | None = None
    seed: int = 0
    log_every: int = 25

    def model(self) -> NATClassifier:
        return NATClassifier(
            num_classes=self.num_classes, embed_dim=self.embed_dim, depths=self.depths,
            num_heads=self.num_heads, kernel_size=self.kernel_size, dilated=self.dilated,
            rel_pos_bias=self.rel_pos_bias, attention=self.attention, backend=self.backend,
            dense_implementation=self.dense_implementation,
            dtype=None if self.dtype == "float32" else jnp.dtype(self.dtype))


# ---- data ------------------------------------------------------------------------------------------


def synthetic_templates(key, num_classes: int, image_size: int, channels: int) -> jax.Array:
    """One smooth random image per class, ``[num_classes, S, S, C]`` with unit variance: white
    noise blurred by a 5x5 box filter (low frequencies, so the classes differ at the scale of
    the network's windows, not only pixel by pixel)."""
    noise = jax.random.normal(key, (num_classes, image_size, image_size, channels))
    blur = jnp.ones((5, 5, 1, 1)) / 25.0
    smooth = jax.lax.conv_general_dilated(
        noise.transpose(0, 3, 1, 2).reshape(-1, 1, image_size, image_size), blur.transpose(3, 2, 0, 1),
        (1, 1), "SAME").reshape(num_classes, channels, image_size, image_size).transpose(0, 2, 3, 1)
    return smooth / smooth.std(axis=(1, 2, 3), keepdims=True)


def synthetic_batch(key, templates: jax.Array, batch: int, noise: float):
    """``(images [batch, S, S, C] float32, labels [batch] int32)``: a class template plus
    Gaussian noise of standard deviation ``noise`` (1.0: as strong as the signal)."""
    label_key, noise_key = jax.random.split(key)
    labels = jax.random.randint(label_key, (batch,), 0, templates.shape[0])
    images = templates[labels] + noise * jax.random.normal(noise_key, (batch, *templates.shape[1:]))
    return images, labels


def load_npz(path: str):
    """``(images float32 [N, S, S, C] standardized, labels int32 [N])`` from an .npz file."""
    with np.load(path) as f:
        if "images" not in f or "labels" not in f:
            raise ValueError(f"{path}: expected arrays 'images' [N, S, S, C] and 'labels' [N], "
                             f"found {sorted(f.keys())}.")
        images, labels = np.asarray(f["images"], np.float32), np.asarray(f["labels"], np.int32)
    if images.ndim != 4 or images.shape[1] != images.shape[2] or labels.shape != images.shape[:1]:
        raise ValueError(f"{path}: images {images.shape} must be [N, S, S, C] and labels "
                         f"{labels.shape} must be [N].")
    images = (images - images.mean()) / max(float(images.std()), 1e-6)
    return images, labels


# ---- training --------------------------------------------------------------------------------------


def _optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, min(cfg.warmup_steps, max(cfg.steps - 1, 1)), max(cfg.steps, 2))
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=cfg.weight_decay))


def train(cfg: TrainConfig, log=print) -> dict[str, Any]:
    """Trains ``cfg.model()`` for ``cfg.steps`` steps.

    Returns:
      ``{"losses": [per-step loss], "accuracies": [...], "images_per_s": ..., "ms_per_step": ...,
      "params": the trained params}``; speeds are over the steps after the first (which compiles).
    """
    model = cfg.model()
    # "rbg" keys: XLA compiles their generator several times faster than threefry's (on a CPU,
    # threefry for the ~40 parameter initializers dominated the start-up); statistically fine
    # for initialization and synthetic data.
    key = jax.random.key(cfg.seed, impl="rbg")
    init_key, data_key, step_key = jax.random.split(key, 3)
    if cfg.data is None:
        templates = synthetic_templates(data_key, cfg.num_classes, cfg.image_size, cfg.channels)
        sample_shape = templates.shape[1:]

        def batch_at(step):
            return synthetic_batch(jax.random.fold_in(step_key, step), templates, cfg.batch, cfg.noise)
    else:
        images, labels = load_npz(cfg.data)
        if labels.max() >= cfg.num_classes:
            raise ValueError(f"--data has label {labels.max()} but --num-classes is {cfg.num_classes}.")
        sample_shape = images.shape[1:]
        images, labels = jnp.asarray(images), jnp.asarray(labels)

        def batch_at(step):
            idx = jax.random.randint(jax.random.fold_in(step_key, step), (cfg.batch,), 0, labels.shape[0])
            return images[idx], labels[idx]

    # Jitted: an eager init would dispatch (and compile) every op of the network one by one.
    params = jax.jit(model.init)(init_key, jnp.zeros((1, *sample_shape), jnp.float32))
    opt = _optimizer(cfg)
    opt_state = opt.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, step):
        images, labels = batch_at(step)

        def loss_fn(p):
            logits = model.apply(p, images)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, jnp.mean(jnp.argmax(logits, -1) == labels)

        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, acc

    losses, accuracies = [], []
    start = None
    for step in range(cfg.steps):
        params, opt_state, loss, acc = train_step(params, opt_state, jnp.int32(step))
        if step == 0:
            loss.block_until_ready()
            start = time.perf_counter()  # the first step compiles: time the rest
        losses.append(loss)
        accuracies.append(acc)
        if cfg.log_every and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
            window = slice(max(0, step + 1 - cfg.log_every), step + 1)
            log(f"step {step + 1:5d}  loss {float(np.mean(jax.device_get(losses[window]))):.4f}  "
                f"acc {float(np.mean(jax.device_get(accuracies[window]))):.3f}")
    jax.block_until_ready(params)
    elapsed = time.perf_counter() - start if start is not None else 0.0
    timed = cfg.steps - 1
    return dict(
        losses=[float(x) for x in jax.device_get(losses)],
        accuracies=[float(x) for x in jax.device_get(accuracies)],
        images_per_s=cfg.batch * timed / elapsed if timed and elapsed else None,
        ms_per_step=1e3 * elapsed / timed if timed else None,
        params=params,
    )


# ---- command line ----------------------------------------------------------------------------------


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(","))


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m examples.nat_classifier.train",
                                description="Train a small NAT/DiNAT classifier with jna.")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--image-size", type=int, default=d.image_size, help="synthetic image side")
    p.add_argument("--channels", type=int, default=d.channels, help="synthetic image channels")
    p.add_argument("--num-classes", type=int, default=d.num_classes)
    p.add_argument("--embed-dim", type=int, default=d.embed_dim, help="stage-0 channels")
    p.add_argument("--depths", type=_ints, default=d.depths, help="blocks per stage, e.g. 2,2")
    p.add_argument("--heads", type=_ints, default=d.num_heads, help="heads per stage, e.g. 2,4")
    p.add_argument("--kernel-size", type=int, default=d.kernel_size)
    p.add_argument("--no-dilation", dest="dilated", action="store_false",
                   help="NAT (dilation 1 everywhere) instead of DiNAT's alternating dilation")
    p.add_argument("--rpb", dest="rel_pos_bias", action=argparse.BooleanOptionalAction,
                   default=d.rel_pos_bias, help="relative positional bias (--no-rpb: off)")
    p.add_argument("--attention", choices=("na", "dense"), default=d.attention,
                   help="na: jna neighborhood attention; dense: jax.nn.dot_product_attention")
    p.add_argument("--backend", default=d.backend, help="jna backend for --attention na")
    p.add_argument("--dense-implementation", choices=("xla", "cudnn"), default=None,
                   help="jax.nn.dot_product_attention implementation for --attention dense")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=d.dtype,
                   help="computation dtype (params stay float32)")
    p.add_argument("--lr", dest="learning_rate", type=float, default=d.learning_rate)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--noise", type=float, default=d.noise, help="synthetic noise level")
    p.add_argument("--data", default=None, help=".npz with images [N, S, S, C] and labels [N]")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--log-every", type=int, default=d.log_every)
    args = vars(p.parse_args(argv))
    args["num_heads"] = args.pop("heads")
    return TrainConfig(**args)


def _peak_memory_gib() -> float | None:
    """The device's peak bytes in use so far (GiB; run one configuration per process to read one
    model's peak), or None where the backend keeps no memory statistics (the CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else round(peak / 2**30, 3)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {cfg}", flush=True)
    result = train(cfg)
    summary = {k: v for k, v in dataclasses.asdict(cfg).items()}
    summary.update(final_loss=float(np.mean(result["losses"][-cfg.log_every or -1:])),
                   images_per_s=result["images_per_s"], ms_per_step=result["ms_per_step"],
                   peak_memory_gib=_peak_memory_gib())
    print(json.dumps(summary), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
