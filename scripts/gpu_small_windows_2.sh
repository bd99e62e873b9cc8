#!/usr/bin/env bash
# Small windows (issue 16), second pass: the fused-triton GPU subset (the forward is now two
# launches with a device-side finite flag; float32 products tf32x3), the tuner measuring both
# fused backends on the paper sweeps (so that `auto` picks by measurement), the call profile,
# and the small problems timed with auto reading those measurements.
#   scripts/gpu_small_windows_2.sh OUT_DIR
set -uo pipefail
out=${1:?OUT_DIR}
mkdir -p "$out/tuned"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false JNA_TUNED_DIR=$out/tuned
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/device.txt"
JNA_TEST_BACKENDS=fused-triton timeout 170 python -m pytest -q -p no:cacheprovider -n 8 \
  jna_tests/test_backend_fused_triton.py jna_tests/test_gpu.py jna_tests/test_forward_mode.py \
  -k "not simulator and not mosaic" > "$out/gpu_tests.log" 2>&1
echo "gpu tests rc $?: $(tail -1 "$out/gpu_tests.log")"
grep -E "^(FAILED|ERROR)" "$out/gpu_tests.log" | head -10
sweeps=sweep-1d-k3,sweep-1d-k15,sweep-1d-k63,sweep-1d-k127,sweep-2d-k3,sweep-2d-k7,sweep-2d-k13,sweep-3d-k7
for b in fused-triton fused-mosaic; do
  timeout 110 python -m jna.tuning --backend $b --problems paper_sweeps --names $sweeps --objective fwd_bwd \
    --shapes-per-class 1 --max-candidates 2 --budget-s 0.15 > "$out/tune_$b.log" 2>&1
  echo "tune $b rc $?"; grep -E ": best" "$out/tune_$b.log"
done
timeout 60 python -m benchmarks profile-call --problems public --names 2d-nat,2d-dinat \
  --backends fused-triton --modes fwd,fwd_bwd --iters 20 --out "$out/profile" > "$out/profile.log" 2>&1
echo "profile rc $?"; grep "^|" "$out/profile/call_profile.md" | cut -c1-250
rm -rf "$out/profile/traces" "$out/profile"/*.json.gz 2>/dev/null
timeout 90 python -m benchmarks run --problems paper_sweeps --names $sweeps --backends auto,fused-triton \
  --baseline none --modes fwd,fwd_bwd --budget-s 0.4 --out "$out/sweeps" > "$out/sweeps.log" 2>&1
echo "sweeps rc $?"; grep "^|" "$out/sweeps/bench.md" | cut -d'|' -f2-5,6,9,10
timeout 60 python -m benchmarks run --problems public --names 2d-nat,2d-dinat --backends fused-triton,unfused \
  --baseline none --dtypes bfloat16,float32 --modes fwd,fwd_bwd --budget-s 0.4 --out "$out/nat" > "$out/nat.log" 2>&1
echo "nat rc $?"; grep "^|" "$out/nat/bench.md" | cut -d'|' -f2-5,6,9,10
find "$out" -type f | wc -l
