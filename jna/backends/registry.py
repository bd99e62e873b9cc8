"""The backend registry: the names jna knows, ``auto``'s order, and the choice of a backend for a
call (`choose`, `resolve`). `jna.backends` re-exports all of it (see its docstring)."""


from __future__ import annotations

import dataclasses
import functools
import importlib
import warnings

from jna._src.arguments import NAProblem
from jna.backends import device
from jna.backends.base import Backend

__all__ = [
    "KNOWN_BACKENDS", "AUTO_ORDER", "Choice", "built_backends", "native_backends", "backend_class",
    "get", "choose", "resolve", "check_backend", "check_backend_name",
]

# Every backend name jna knows: the module and class that implement it.
_CLASSES: dict[str, tuple[str, str]] = {
    "reference": ("jna.backends.reference", "Reference"),
    "fused-mosaic": ("jna.backends.mosaic.op", "FusedMosaic"),
    "fused-triton": ("jna.backends.triton.fused", "FusedTriton"),
    "unfused": ("jna.backends.triton.unfused", "Unfused"),  # not in AUTO_ORDER: explicit only
}

# Preference of "auto", fastest first.
AUTO_ORDER = ("fused-mosaic", "fused-triton", "reference")

KNOWN_BACKENDS = ("auto", *_CLASSES)


def built_backends() -> tuple[str, ...]:
    """Names of the backends that exist in this version of jna."""
    return tuple(_CLASSES)


def backend_class(name: str) -> type[Backend]:
    """The class of the backend named ``name`` (its capability flags, e.g. ``supports_rpb``,
    are class attributes)."""
    if check_backend(name) == "auto" or not isinstance(name, str):
        raise ValueError(f"jna.backends.get/backend_class take a backend name "
                         f"({', '.join(map(repr, _CLASSES))}), got {name!r}; 'auto' depends on the "
                         f"call: use choose(backend, problem).")
    module, cls = _CLASSES[name]
    return getattr(importlib.import_module(module), cls)


def get(name: str) -> Backend:
    """The backend named ``name`` with its default config (``get("fused-triton")``)."""
    return backend_class(name)()


def native_backends() -> tuple[str, ...]:
    """Built backends that run natively on the current default device (not emulated)."""
    return tuple(name for name in built_backends() if get(name).runs_natively())


def check_backend(backend) -> str | Backend:
    """Validates a ``backend=`` argument (a known name or a `Backend` instance); returns it."""
    if isinstance(backend, Backend):
        return backend
    if not isinstance(backend, str) or backend not in KNOWN_BACKENDS:
        raise ValueError(
            f"backend={backend!r} is not a jna backend; choose one of "
            f"{', '.join(map(repr, KNOWN_BACKENDS))} or pass a jna.backends.Backend instance "
            f"(e.g. jna.backends.FusedTriton(config)).")
    return backend


check_backend_name = check_backend  # the earlier name, kept for callers outside jna


@functools.lru_cache(maxsize=64)
def _warn_reference_on_gpu(reasons: tuple[str, ...]) -> None:
    """Warns once per distinct set of reasons that ``auto`` runs the slow reference on a GPU."""
    warnings.warn(
        "jna: backend='auto' runs the reference backend (pure jax.numpy, slow) on this GPU: "
        + "; ".join(reasons), stacklevel=4)


@dataclasses.dataclass(frozen=True)
class Choice:
    """Which backend runs a call, and why the backends before it in `AUTO_ORDER` did not.

    ``backend``: the instance that runs it; ``passed_over``: ``(name, reason)`` for each backend
    ``auto`` tried first (empty for an explicit backend).
    """

    backend: Backend
    passed_over: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        return self.backend.name


def choose(backend: str | Backend, problem: NAProblem) -> Choice:
    """The backend that will run ``problem``, with the reasons behind the choice.

    Raises:
      ValueError / NotImplementedError: for a bad name, or an explicit backend that is not
        available on this device or does not support the call (with the reason).
    """
    backend = check_backend(backend)
    if backend == "auto":
        passed_over = []
        for name in AUTO_ORDER:
            candidate = get(name)
            available, reason = candidate.is_available()
            # A feature the backend lacks (rpb) disqualifies it outright: auto never drops one.
            why = candidate.unsupported_feature(problem) or (
                None if candidate.runs_natively()
                else reason if not available else f"only emulated here ({reason})") \
                or candidate.supports(problem) or candidate.auto_declines(problem)
            if why is None:
                return Choice(candidate, tuple(passed_over))
            passed_over.append((name, why))
        raise NotImplementedError("no jna backend supports this call")  # reference takes all
    instance = get(backend) if isinstance(backend, str) else backend
    # A missing feature first: it holds on every machine, so it is the reason worth reading.
    reason = instance.unsupported_feature(problem)
    if reason is not None:
        raise NotImplementedError(f"backend={instance.name!r} does not support this call: {reason}")
    available, why = instance.is_available()
    if not available:
        raise NotImplementedError(f"backend={instance.name!r} cannot run on this machine: {why}")
    reason = instance.supports(problem)
    if reason is not None:
        raise NotImplementedError(f"backend={instance.name!r} does not support this call: {reason}")
    return Choice(instance)


def resolve(backend: str | Backend, problem: NAProblem) -> Backend:
    """The backend instance that will run ``problem`` (`choose`; ``auto`` warns once when it
    runs the reference backend on a GPU)."""
    choice = choose(backend, problem)
    if backend == "auto" and choice.name == "reference" and device.default_device().platform == "gpu":
        _warn_reference_on_gpu(tuple(f"{name}: {why}" for name, why in choice.passed_over))
    return choice.backend
