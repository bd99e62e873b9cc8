"""Which device the Pallas backends run on, and whether they can (shared by the kernel backends)."""

from __future__ import annotations

import jax


def default_device():
    return jax.devices()[0]


def emulated() -> bool:
    """True on a CPU-only machine, where Pallas kernels run interpreted/simulated (tests only)."""
    return default_device().platform == "cpu"


def gpu_availability(min_cc: float, max_cc: float, needs: str, on_cpu: str) -> tuple[bool, str]:
    """``(available, reason)`` for a backend needing an NVIDIA GPU with ``min_cc <= cc < max_cc``.

    Args:
      needs: what the backend needs, for the message (e.g. "an NVIDIA GPU of compute capability >= 8.0").
      on_cpu: how it runs on a CPU-only machine (e.g. "interpret mode on CPU").
    """
    device = default_device()
    if device.platform == "cpu":
        return True, on_cpu
    if device.platform != "gpu":
        return False, f"needs {needs} or a CPU ({on_cpu}); found {device.platform}"
    cc = getattr(device, "compute_capability", None)
    if cc is None or not min_cc <= float(cc) < max_cc:
        return False, f"needs {needs}; found {device.device_kind} ({cc})"
    return True, ""
