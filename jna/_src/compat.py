"""The one place that knows jax versions: jna supports ``jax>=0.11.2,<0.13``.

The public Pallas modules jna's kernels import (``jax.experimental.pallas``, ``.mosaic_gpu``,
``.triton``) keep their names and the signatures jna uses across that range (checked by diffing
their public signatures between 0.11.2 and 0.12.0.1: only ``plgpu.load`` lost its positional
``idx``, which jna never passes; it indexes with ``ref.at[...]``). What differs, and is bridged
here:

- the Mosaic GPU simulator's race detector: 0.12 added ``InterpretGPUParams(on_race=...)``,
  defaulting to raising inside the simulated kernel; 0.11 records races for
  ``get_races().races_found``. `mosaic_simulator` asks 0.12 to record them too, so
  `simulator_races_found` reports races the same way on both.
- the Pallas Triton backend: deprecated since 0.11; 0.12 also emits a ``DeprecationWarning``
  when a Triton kernel is lowered. jna uses it on purpose (sm80+, measured) and leaves the
  warning alone: lowering often happens in the user's ``jit``, outside any jna frame, and a
  global filter would also hide it from the user's own Triton kernels.
- private hooks used by tests and tools only: the race report above; the GPU-info query that
  the Triton lowering reads, patched to cross-lower Triton kernels for CUDA on a machine
  without a GPU (`triton_lowering_for_cuda`); and the source locations of lowered code
  (`lowering_without_source_locations`), so that lowered kernels can be compared byte for byte
  across commits that move code but do not change it.

Seen on the GPU under jax 0.12.0.1 and not bridged (nothing here can: it is XLA's), see
``benchmarks/results/h200_install_check_2026-12-01.md``: XLA's Triton GEMM fusion returned wrong
values for a small jitted float32 einsum chain (jna's ``additional_keys`` path is one; the
workaround is ``XLA_FLAGS=--xla_gpu_enable_triton_gemm=false``), and fused-mosaic's backward ran
about 2x slower than under 0.11.2.
"""

from __future__ import annotations

import contextlib
import re
import warnings

import jax

__all__ = [
    "JAX_VERSION", "SUPPORTED_JAX", "jax_version_supported", "mosaic_simulator",
    "simulator_races_found", "triton_lowering_for_cuda", "lowering_without_source_locations",
]

SUPPORTED_JAX = ">=0.11.2,<0.13"


def _parse(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


JAX_VERSION = _parse(jax.__version__)


def jax_version_supported(version: tuple[int, ...] = JAX_VERSION) -> bool:
    return (0, 11, 2) <= version < (0, 13)


if not jax_version_supported():
    warnings.warn(f"jna supports jax {SUPPORTED_JAX}; this is jax {jax.__version__}: its Pallas "
                  "kernels may fail to lower.", RuntimeWarning, stacklevel=2)


def mosaic_simulator(detect_races: bool = False):
    """``plgpu.InterpretGPUParams`` for the Mosaic GPU CPU simulator, recording (not raising on)
    races when ``detect_races`` (read them with `simulator_races_found`)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if detect_races and JAX_VERSION >= (0, 12):
        return plgpu.InterpretGPUParams(detect_races=True, on_race="warn")
    return plgpu.InterpretGPUParams(detect_races=detect_races)


def simulator_races_found() -> bool:
    """Whether the Mosaic GPU simulator's race detector fired in this process (private API)."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

    return bool(interpret_pallas_call.get_races().races_found)


@contextlib.contextmanager
def triton_lowering_for_cuda(compute_capability: int = 90):
    """Lets Pallas Triton kernels lower for CUDA on a machine without a GPU (private hook).

    The Triton lowering asks the local GPU for its compute capability; this answers
    ``compute_capability`` instead for the duration. Used with ``jax.export(...,
    platforms=["cuda"])`` or ``.lower(lowering_platforms=("cuda",))`` by tests and the
    lowered-kernel dump (``benchmarks/lowered_kernels.py``).
    """
    from types import SimpleNamespace

    from jax._src.pallas.triton import pallas_call_registration as registration

    saved = registration.gpu_info_lib.get_gpu_info
    registration.gpu_info_lib.get_gpu_info = lambda: SimpleNamespace(
        compute_capability=compute_capability)
    try:
        yield
    finally:
        registration.gpu_info_lib.get_gpu_info = saved


@contextlib.contextmanager
def lowering_without_source_locations():
    """Lowers with no file/line locations (names of operations kept), also inside the Pallas
    kernels that Mosaic GPU serializes into custom calls (private hook)."""
    from jax._src.interpreters import mlir

    original = mlir.source_info_to_location

    def names_only(ctx, primitive, name_stack, traceback):
        return original(ctx, primitive, name_stack, None)  # no traceback: an unknown location

    mlir.source_info_to_location = names_only
    try:
        yield
    finally:
        mlir.source_info_to_location = original
