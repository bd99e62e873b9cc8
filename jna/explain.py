"""`jna.explain`: which backend and tile config a call would run with, and why.

    >>> print(jna.explain(q, k, v, kernel_size=7))
    backend: fused-triton (auto) on cpu
    config:  TritonConfig(q_tile=(8, 8), ...) (tile efficiency x calibrated class speeds)
    passed over:
      fused-mosaic: ...

It runs nothing: it validates the call exactly as `jna.neighborhood_attention` does and asks the
same backend choice (`jna.backends.choose`), so what it says is what the call will do.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jna import backends
from jna._src.arguments import NAProblem, check_call
from jna.backends import device

__all__ = ["Explanation", "explain"]


@dataclasses.dataclass(frozen=True)
class Explanation:
    """What `explain` found.

    Attributes:
      backend: the backend that runs the call.
      requested: the ``backend`` argument (``"auto"``, a name, or a backend instance's repr).
      config: the backend's tile config for this call (None for the reference backend).
      config_source: where that config comes from (the instance's explicit config, this
        device's tuned table, or the calibrated launch classes).
      passed_over: ``(backend, reason)`` for each faster backend ``auto`` did not take.
      device: the device kind the choice was made for.
      problem: the validated call (`jna._src.arguments.NAProblem`).
    """

    backend: str
    requested: str
    config: Any
    config_source: str | None
    passed_over: tuple[tuple[str, str], ...]
    device: str
    problem: NAProblem

    def __str__(self) -> str:
        lines = [f"backend: {self.backend} ({self.requested}) on {self.device}"]
        if self.config is not None:
            lines.append(f"config:  {self.config} ({self.config_source})")
        if self.passed_over:
            lines.append("passed over:")
            lines += [f"  {name}: {why}" for name, why in self.passed_over]
        p = self.problem
        lines.append(f"problem: shape {p.spatial_shape}, kernel {p.params.kernel_size}, stride "
                     f"{p.params.stride}, dilation {p.params.dilation}, causal {p.params.is_causal}, "
                     f"B {p.batch}, H {p.heads}/{p.kv_heads}, D {p.head_dim}/{p.value_dim}, "
                     f"{p.dtype.name}" + (", rpb" if p.has_rpb else ""))
        return "\n".join(lines)


def explain(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
            additional_keys=None, additional_values=None,
            backend: "str | backends.base.Backend" = "auto", rpb=None) -> Explanation:
    """Says which backend and tile config `jna.neighborhood_attention` would use for this call.

    Args: as `jna.neighborhood_attention` (q, k, v and rpb may be arrays or
      ``jax.ShapeDtypeStruct``: only shapes and dtypes are read).

    Returns:
      An `Explanation` (``print`` it for a summary).

    Raises:
      ValueError / NotImplementedError: exactly where the call itself would raise.
    """
    backends.check_backend_name(backend)
    problem = check_call(q, k, v, kernel_size, stride, dilation, is_causal, scale,
                         additional_keys, additional_values, None, rpb=rpb)
    choice = backends.choose(backend, problem)
    return Explanation(choice.name, backend if isinstance(backend, str) else repr(backend),
                       choice.backend.config_for(problem), choice.backend.config_source(problem),
                       choice.passed_over, device.default_device().device_kind, problem)
