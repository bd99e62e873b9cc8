"""Backend registry and the choice behind ``backend="auto"``.

A backend module exposes ``NAME``, ``is_available() -> (bool, reason)``,
``runs_natively() -> bool`` (False where it would only run emulated, e.g. Pallas interpret mode
on a CPU: ``auto`` skips it there), ``unsupported_reason(problem) -> str | None`` and
``attention(q, k, v, problem) -> (out, lse)`` (differentiable in q, k, v, and in both outputs).

An explicitly named backend never falls back silently: if it cannot run the call, that is an
error that says why. ``"auto"`` takes the first backend of `AUTO_ORDER` that is available on the
current device and supports the call (a backend may also define ``auto_declines(problem) -> str |
None`` to let ``auto`` pass a call on to the next backend where it is measured slower).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import warnings
from types import ModuleType

from jna.arguments import NAProblem
from jna.backends import device

# Every backend name jna knows, with the module that implements it (None: planned, not built).
_MODULES: dict[str, str | None] = {
    "reference": "jna.backends.reference",
    "fused-mosaic": "jna.backends.fused_mosaic",
    "fused-triton": "jna.backends.fused_triton",
    "unfused": "jna.backends.unfused",  # not in AUTO_ORDER: explicit only
}

# Preference of "auto", fastest first.
AUTO_ORDER = ("fused-mosaic", "fused-triton", "reference")

KNOWN_BACKENDS = ("auto", *_MODULES)


def built_backends() -> tuple[str, ...]:
    """Names of the backends that exist in this version of jna."""
    return tuple(name for name, module in _MODULES.items() if module is not None)


def native_backends() -> tuple[str, ...]:
    """Built backends that run natively on the current default device (not emulated)."""
    return tuple(name for name in built_backends() if _load(name).runs_natively())


def _load(name: str) -> ModuleType:
    return importlib.import_module(_MODULES[name])


def check_backend_name(backend) -> str:
    """Validates a backend name; returns it. Unknown -> ValueError, planned -> NotImplementedError."""
    if not isinstance(backend, str) or backend not in KNOWN_BACKENDS:
        raise ValueError(
            f"backend={backend!r} is not a jna backend; choose one of {', '.join(map(repr, KNOWN_BACKENDS))}."
        )
    if backend != "auto" and _MODULES[backend] is None:
        raise NotImplementedError(
            f"backend={backend!r} is not built yet in this version of jna; built backends: "
            f"{', '.join(map(repr, built_backends()))}."
        )
    return backend


@functools.lru_cache(maxsize=64)
def _warn_reference_on_gpu(reasons: tuple[str, ...]) -> None:
    """Warns once per distinct set of reasons that ``auto`` runs the slow reference on a GPU."""
    warnings.warn(
        "jna: backend='auto' runs the reference backend (pure jax.numpy, slow) on this GPU: "
        + "; ".join(reasons), stacklevel=4)


@dataclasses.dataclass(frozen=True)
class Choice:
    """Which backend runs a call, and why the backends before it in `AUTO_ORDER` did not.

    ``passed_over``: ``(name, reason)`` for each backend ``auto`` tried first (empty for an
    explicitly named backend).
    """

    name: str
    module: ModuleType
    passed_over: tuple[tuple[str, str], ...] = ()


def choose(backend: str, problem: NAProblem) -> Choice:
    """The backend that will run ``problem``, with the reasons behind the choice.

    Raises:
      ValueError / NotImplementedError: for a bad name, or an explicit backend that is not
        available on this device or does not support the call (with the reason).
    """
    backend = check_backend_name(backend)
    if backend == "auto":
        passed_over = []
        for name in AUTO_ORDER:
            if _MODULES[name] is None:
                continue
            module = _load(name)
            declines = getattr(module, "auto_declines", lambda problem: None)
            available, reason = module.is_available()
            why = (None if module.runs_natively()
                   else reason if not available else f"only emulated here ({reason})") \
                or module.unsupported_reason(problem) or declines(problem)
            if why is None:
                return Choice(name, module, tuple(passed_over))
            passed_over.append((name, why))
        raise NotImplementedError("no jna backend supports this call")  # reference takes all
    module = _load(backend)
    available, why = module.is_available()
    if not available:
        raise NotImplementedError(f"backend={backend!r} cannot run on this machine: {why}")
    reason = module.unsupported_reason(problem)
    if reason is not None:
        raise NotImplementedError(f"backend={backend!r} does not support this call: {reason}")
    return Choice(backend, module)


def resolve(backend: str, problem: NAProblem) -> ModuleType:
    """The backend module that will run ``problem`` (`choose`; ``auto`` warns once when it
    runs the reference backend on a GPU)."""
    choice = choose(backend, problem)
    if backend == "auto" and choice.name == "reference" and device.default_device().platform == "gpu":
        _warn_reference_on_gpu(tuple(f"{name}: {why}" for name, why in choice.passed_over))
    return choice.module
