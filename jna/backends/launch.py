"""Launch classes: the one type for a fused backend's tile sizes, launch parameters and speeds.

A launch class is a tile size (tokens per Q tile and per KV tile) with the backend's launch
parameters (fused-triton: warps and stages of the forward and backward; fused-mosaic: pipeline
stages) and its calibrated speed. For each call a backend picks the class and per-axis tile shapes
that maximize ``tile efficiency x speed`` (`jna.backends.tiling.choose_tiles`); the tuner
(`jna.tuning`) measures classes per problem and keys its tables on `LaunchClass.fields`.

The classes live in ``configs/<backend>.json`` (shipped as ``jna.configs``), one flat JSON object
per class: ``q_tokens``, ``kv_tokens``, optional ``max_head_dim``, ``speed``, ``fwd_bwd_speed`` and
the launch parameters. ``python -m benchmarks calibrate --backend NAME`` measures the speeds.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from jna._src import resources

_SPEEDS = ("speed", "fwd_bwd_speed")


@dataclasses.dataclass(frozen=True)
class LaunchClass:
    """A tile size with launch parameters and its measured speed.

    Attributes:
      q_tokens, kv_tokens: tokens per Q tile and per KV tile (products of the per-axis tile shape).
      launch: the backend's launch parameters as sorted ``(name, value)`` pairs (hashable), e.g.
        ``(("num_stages", 2),)``; read one with `param`.
      max_head_dim: the largest head dim the class is for (None: any); a call uses the classes of
        the smallest bucket that covers its head dim (`for_head_dim`).
      speed: forward TFLOP/s at full tile efficiency (calibrated on the GPU); the chooser
        multiplies it by a problem's tile efficiency.
      fwd_bwd_speed: forward+backward TFLOP/s at full tile efficiency (informational).
    """

    q_tokens: int
    kv_tokens: int
    launch: tuple[tuple[str, Any], ...] = ()
    max_head_dim: int | None = None
    speed: float = 0.0
    fwd_bwd_speed: float = 0.0

    @classmethod
    def from_json(cls, entry: dict) -> LaunchClass:
        """A class from its flat JSON object (the launch parameters are the unnamed fields)."""
        named = {"q_tokens", "kv_tokens", "max_head_dim", *_SPEEDS}
        launch = tuple(sorted((k, v) for k, v in entry.items() if k not in named))
        return cls(entry["q_tokens"], entry["kv_tokens"], launch, entry.get("max_head_dim"),
                   entry.get("speed", 0.0), entry.get("fwd_bwd_speed", 0.0))

    def to_json(self) -> dict:
        """The flat JSON object `from_json` reads."""
        out = self.fields
        out.update(speed=self.speed, fwd_bwd_speed=self.fwd_bwd_speed)
        return out

    @property
    def fields(self) -> dict:
        """The class without its speeds: what the tuner measures and `jna.tuning.tables` keys on."""
        out = {} if self.max_head_dim is None else {"max_head_dim": self.max_head_dim}
        out.update(q_tokens=self.q_tokens, kv_tokens=self.kv_tokens, **dict(self.launch))
        return out

    @property
    def key(self) -> str:
        """`fields` as the tuned tables' key (sorted JSON)."""
        return json.dumps(self.fields, sort_keys=True)

    def param(self, name: str):
        """One launch parameter, e.g. ``c.param("num_stages")``."""
        return dict(self.launch)[name]

    def with_speeds(self, speed: float, fwd_bwd_speed: float) -> LaunchClass:
        return dataclasses.replace(self, speed=speed, fwd_bwd_speed=fwd_bwd_speed)


def load(config_file: str) -> tuple[LaunchClass, ...]:
    """The classes of ``configs/<config_file>``."""
    return tuple(LaunchClass.from_json(c) for c in resources.read_json(config_file)["classes"])


def for_head_dim(classes, head_dim: int) -> list[LaunchClass]:
    """The classes of the smallest ``max_head_dim`` bucket covering ``head_dim`` (every class when
    none has a bound)."""
    if all(c.max_head_dim is None for c in classes):
        return list(classes)
    fitting = [c for c in classes if c.max_head_dim is not None and head_dim <= c.max_head_dim]
    if not fitting:
        return []
    bucket = min(c.max_head_dim for c in fitting)
    return [c for c in fitting if c.max_head_dim == bucket]


def dump_config(raw: dict) -> str:
    """A launch-class config file as JSON with one line per class (readable diffs)."""
    head = {k: v for k, v in raw.items() if k != "classes"}
    lines = ["{"] + [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
    lines.append(' "classes": [')
    lines.append(",\n".join(f"  {json.dumps(c)}" for c in raw["classes"]))
    lines += [" ]", "}"]
    return "\n".join(lines) + "\n"
