"""The backend registry and the choice behind ``backend="auto"``.

Every backend implements `jna.backends.base.Backend` (availability, ``supports``, a frozen tile
config, ``default_config``/``candidate_configs``, ``attention``). The public API's ``backend=``
takes a name (``"auto"``, ``"reference"``, ``"fused-triton"``, ``"fused-mosaic"``,
``"unfused"``) or a backend instance, which may carry an explicit config::

    jna.na2d(q, k, v, kernel_size=7, backend=jna.backends.FusedTriton(jna.backends.TritonConfig(
        q_tile=(8, 8), kv_tile=(8, 8))))

An explicitly named backend never falls back silently: if it cannot run the call, that is an
error that says why. ``"auto"`` takes the first backend of `AUTO_ORDER` that has the call's
optional features (capability flags such as ``supports_rpb``: a relative positional bias is never
dropped), runs natively on the current device, supports the call and does not decline it
(``auto_declines``: measured slower).

The backend classes are imported on first use (``jna.backends.FusedTriton`` loads the Pallas
Triton backend then, not at ``import jna``).
"""

from __future__ import annotations

import importlib

from jna.backends import device  # noqa: F401  (tests patch jna.backends.device)
from jna.backends.base import Backend
from jna.backends.registry import (  # noqa: F401
    AUTO_ORDER, KNOWN_BACKENDS, Choice, _CLASSES, _warn_reference_on_gpu, backend_class,
    built_backends, check_backend, check_backend_name, choose, get, native_backends, resolve,
)

__all__ = [
    "Backend", "Reference", "FusedTriton", "FusedMosaic", "Unfused", "TritonConfig", "MosaicConfig",
    "KNOWN_BACKENDS", "AUTO_ORDER", "built_backends", "native_backends", "backend_class", "get",
    "choose", "resolve", "check_backend",
]

# Names importable from here, loaded on first use (PEP 562): the backend classes and configs.
_LAZY = {cls: module for module, cls in _CLASSES.values()} | {
    "TritonConfig": "jna.backends.triton.fused", "MosaicConfig": "jna.backends.mosaic.common"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jna.backends' has no attribute {name!r}")
