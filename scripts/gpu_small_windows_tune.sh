#!/usr/bin/env bash
# Small windows (issue 16): the tuner measures both fused backends on the paper sweeps (the
# entries `auto` compares: `fused_mosaic.auto_declines`), then auto is timed reading them.
#   scripts/gpu_small_windows_tune.sh OUT_DIR   (at most 8 files come back: see device/README)
set -uo pipefail
out=${1:?OUT_DIR}
mkdir -p "$out/tuned"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false JNA_TUNED_DIR=$out/tuned
sweeps=sweep-1d-k3,sweep-1d-k15,sweep-1d-k63,sweep-1d-k127,sweep-2d-k3,sweep-2d-k7,sweep-2d-k13,sweep-3d-k7
for b in fused-triton fused-mosaic; do
  timeout 170 python -m jna.tuning --backend $b --problems paper_sweeps --names $sweeps --objective fwd_bwd \
    --shapes-per-class 1 --max-candidates 1 --budget-s 0.15 > "$out/tune_$b.log" 2>&1
  echo "tune $b rc $?"; grep -E ": best" "$out/tune_$b.log"
done
timeout 80 python -m benchmarks run --problems paper_sweeps --names $sweeps --backends auto \
  --baseline none --modes fwd,fwd_bwd --budget-s 0.3 --out "$out/sweeps" > "$out/sweeps.log" 2>&1
echo "sweeps rc $?"; grep "^|" "$out/sweeps/bench.md" | cut -d'|' -f2-5,6,9,10
find "$out" -type f
