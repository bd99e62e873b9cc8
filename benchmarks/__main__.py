"""``python -m benchmarks COMMAND [args]``: every jna benchmark and GPU tool, one command.

Run from the repository root (jna installed, e.g. ``pip install -e .``). ``python -m benchmarks``
lists the commands; ``python -m benchmarks COMMAND --help`` gives a command's arguments. Each
command is one module of this package over the shared harness (`benchmarks.harness`), also
runnable as ``python -m benchmarks.<module>``.
"""

from __future__ import annotations

import importlib
import sys

# command -> module of this package (its ``main`` reads ``sys.argv``)
COMMANDS = {
    "run": "bench",                     # problem sets x backends x modes vs dense attention; sweeps, plots
    "gpu-check": "gpu_check",           # GPU test subset + memory check + benchmark table, one call
    "unfused": "bench_unfused",         # the unfused backend against the reference
    "sharding": "bench_sharding",       # sharded NA: halo exchange, batch parallel
    "sharding-model": "sharding_model",  # scaling model of sharded NA on paper
    "profile": "mosaic_profile",        # where fused-mosaic's time goes
    "profile-triton": "profile_parts",  # where a fused-triton call's time goes
    "calibrate": "calibrate",           # launch-class speeds of a fused backend (configs/*.json)
    "check-mosaic": "mosaic_check",     # fused-mosaic spot checks against the reference
    "variants": "variants",             # fused-mosaic config variants: time, agreement, determinism
    "lowered": "lowered_kernels",       # every kernel lowered for CUDA here, fingerprinted
    "matmul-probe": "matmul_precision_probe",  # small float32 matmuls vs float64, per precision
    "finite-probe": "finite_probe",     # the all-finite guard of the fused kernels: variants, end to end
    "profile-call": "call_profile",     # every kernel of one compiled call, with its time (CUPTI trace)
    "region-walk": "region_walk",       # fused-triton's key-region walk vs aligned KV tiles
    "rpb": "rpb_bench",                 # relative positional bias in the fused kernels vs without, vs unfused
    "mask-work": "mask_work",           # fused-triton's default configs under variants of its per-tile work
}


def _summary(module: str) -> str:
    doc = importlib.import_module(f"benchmarks.{module}").__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[0] + "\n\ncommands:")
        for command, module in COMMANDS.items():
            print(f"  {command:17s} {_summary(module)}")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"python -m benchmarks: no command {command!r}; commands: {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(f"benchmarks.{COMMANDS[command]}")
    sys.argv = [f"python -m benchmarks {command}", *rest]
    return module.main() or 0


if __name__ == "__main__":
    sys.exit(main())
