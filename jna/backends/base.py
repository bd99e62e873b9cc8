"""The backend contract: what every jna backend is, and how a tile config reaches its kernels.

A backend is a frozen (hashable) dataclass: its one field, ``config``, is the tile config the
instance runs with (None: the backend chooses one per call, `default_config`). Because the
instance is hashable and a `jax.jit` static argument, a changed config is a different
``backend=`` value and always retraces::

    from jna.backends import FusedTriton, TritonConfig
    out = jna.na2d(q, k, v, kernel_size=7, backend=FusedTriton(TritonConfig((8, 8), (8, 8))))

An explicit config's tiles are fitted to each call (`tiling.fit_tile`: a tile extent larger than
the map, rounded up to a power of two, shrinks), so one config serves several problem sizes.

Optional features are class-level capability flags, checked for every backend in one place
(`unsupported_feature`, called by the registry before the backend's own ``supports``), so that an
explicit backend without a feature raises and ``auto`` passes it over, never dropping the feature:

* ``supports_rpb``: the backend's ``attention`` takes ``rpb=`` (NATTEN 0.17's relative positional
  bias, ``[H, 2K_1 - 1, ..., 2K_n - 1]``; the call's `NAProblem` says ``has_rpb``). A backend
  gains it by setting the flag and adding the argument (see `Backend.attention`).

Callers run a backend through `Backend.run`, which hands ``rpb`` only to backends with the flag.

The name table, ``"auto"`` and the choice between backends are in `jna.backends` (the registry).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

from jna._src.arguments import NAProblem

__all__ = ["Backend"]


@dataclasses.dataclass(frozen=True)
class Backend(abc.ABC):
    """One jna backend (see the module docstring).

    Attributes:
      config: the tile config (the backend's ``config_type``), or None for `default_config`.
    """

    config: Any = None

    name: ClassVar[str]
    config_type: ClassVar[type | None] = None  # None: the backend has no tile config
    launch_config_file: ClassVar[str | None] = None  # its launch classes, in configs/ (jna.configs)
    min_tile_tokens: ClassVar[int] = 1  # smallest Q/KV tile an explicit config is fitted down to
    supports_rpb: ClassVar[bool] = False  # `attention` takes rpb= (relative positional bias)

    def __post_init__(self):
        if self.config is not None and (self.config_type is None
                                        or not isinstance(self.config, self.config_type)):
            want = self.config_type.__name__ if self.config_type else "no config"
            raise ValueError(f"{type(self).__name__} takes {want}, got config={self.config!r}.")

    # -- where it runs ---------------------------------------------------------------------------

    @abc.abstractmethod
    def is_available(self) -> tuple[bool, str]:
        """``(available, reason)`` on the current default device (the reason says how or why not)."""

    @abc.abstractmethod
    def runs_natively(self) -> bool:
        """False where it would only run emulated (Pallas interpret mode on a CPU)."""

    @abc.abstractmethod
    def supports(self, problem: NAProblem) -> str | None:
        """None if the backend runs ``problem``, else the reason it does not (shapes, dtypes,
        parameters; the optional features are `unsupported_feature`'s, checked before this)."""

    def unsupported_feature(self, problem: NAProblem) -> str | None:
        """The first optional feature ``problem`` uses that this backend lacks (its capability
        flags), in words naming the feature and the backend; None if it has them all."""
        if problem.has_rpb and not self.supports_rpb:
            return (f"rpb (relative positional bias) is not implemented in backend {self.name!r}; "
                    f"backends with it: {', '.join(map(repr, _rpb_backends()))}")
        return None

    def auto_declines(self, problem: NAProblem) -> str | None:
        """A reason for ``auto`` to prefer the next backend (measured slower here), or None."""
        return None

    # -- tile configs ----------------------------------------------------------------------------

    def default_config(self, problem: NAProblem):
        """The config the backend picks for ``problem`` (heuristic, then the tuned table)."""
        return None

    def default_config_source(self, problem: NAProblem) -> str | None:
        """Where `default_config` takes its config from, in words."""
        return None

    def launch_classes(self) -> tuple:
        """The backend's launch classes (`jna.backends.launch.LaunchClass`: tile sizes, launch
        parameters, calibrated speeds); () for a backend without tile classes."""
        return ()

    def candidate_configs(self, problem: NAProblem, shapes_per_class: int = 2) -> list:
        """``[(class_fields, config, tile_efficiency)]`` for the tuner (`jna.tuning.tuner`) and the
        calibration (``python -m benchmarks calibrate``): ``class_fields`` is a launch class's
        `LaunchClass.fields`, plus the variant's flags where a class has variants."""
        return []

    def config_for(self, problem: NAProblem):
        """The config this instance runs ``problem`` with: its own, fitted, or the default."""
        if self.config is None:
            return self.default_config(problem)
        from jna.backends import tiling

        return tiling.fit_config(self.config, problem.params, self.min_tile_tokens)

    def config_source(self, problem: NAProblem) -> str | None:
        if self.config is not None:
            return "explicit config (tiles fitted to the call)"
        return self.default_config_source(problem)

    def with_config(self, config) -> "Backend":
        return dataclasses.replace(self, config=config)

    # -- the op ----------------------------------------------------------------------------------

    @abc.abstractmethod
    def attention(self, q, k, v, problem: NAProblem):
        """``(out, lse)`` for the validated call ``problem``, differentiable in q, k, v and in
        both outputs: q ``[B, *X, H, D]``, k/v ``[B, *X, H_kv, D/D_v]`` -> out ``[B, *X, H, D_v]``
        in q's dtype, lse ``[B, *X, H]`` float32.

        A backend with ``supports_rpb`` also takes ``rpb=None``: ``[H, 2K_1 - 1, ..., 2K_n - 1]``
        in float32 or q's dtype, added (in float32) after scaling to the logit of every
        (query ``x``, key ``y``) at ``rpb[h, (y'_a - x'_a) + K_a - 1 per axis]``
        (`jna.semantics.relative_position_index_of_key`), differentiable in ``rpb`` too (its
        cotangent in rpb's dtype). lse includes the bias. Calls with it are non-causal, stride 1
        (`jna._src.arguments.check_rpb`); any dilation, GQA (``H`` = query heads)."""

    def run(self, q, k, v, problem: NAProblem, rpb=None):
        """`attention`, with ``rpb`` (None or the bias table) passed only to a backend that
        declares ``supports_rpb``; for any other backend a bias is a NotImplementedError (never
        dropped)."""
        if rpb is None:
            return self.attention(q, k, v, problem)
        if not self.supports_rpb:
            raise NotImplementedError(
                f"backend={self.name!r} does not support this call: rpb (relative positional bias) "
                f"is not implemented in it.")
        if not problem.has_rpb:
            raise ValueError("rpb was given but the problem was validated without it; pass it to "
                             "check_call(..., rpb=rpb).")
        return self.attention(q, k, v, problem, rpb=rpb)


def _rpb_backends() -> tuple[str, ...]:
    """Names of the built backends that declare ``supports_rpb`` (imports each backend class)."""
    from jna.backends import registry

    return tuple(name for name in registry.built_backends() if registry.backend_class(name).supports_rpb)
