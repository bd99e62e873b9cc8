#!/usr/bin/env bash
# Small windows (issue 16) on the GPU, from the checkout: the fused-triton GPU subset (its forward
# changed), the small problems timed for both fused backends (bf16) and float32 against unfused
# and the reference, a tuner dry run with more tile shapes, and the call profile.
#   scripts/gpu_small_windows.sh OUT_DIR
set -uo pipefail
out=${1:?OUT_DIR}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/device.txt"
small=2d-nat,2d-dinat,sweep-1d-k3,sweep-1d-k15,sweep-1d-k63,sweep-1d-k127,sweep-2d-k3,sweep-2d-k7,sweep-2d-k13,sweep-3d-k7
JNA_TEST_BACKENDS=fused-triton timeout 200 python -m pytest -q -p no:cacheprovider -n 8 \
  jna_tests/test_backend_fused_triton.py jna_tests/test_gpu.py jna_tests/test_forward_mode.py \
  -k "not simulator and not mosaic" > "$out/gpu_tests.log" 2>&1
echo "gpu tests rc $?: $(tail -1 "$out/gpu_tests.log")"
grep -E "^(FAILED|ERROR)" "$out/gpu_tests.log" | head -20
timeout 150 python -m benchmarks run --problems public,paper_sweeps --names "$small" \
  --backends fused-triton,fused-mosaic --modes fwd,fwd_bwd --budget-s 0.5 --out "$out/bf16" > "$out/bf16.log" 2>&1
echo "bf16 bench rc $?"
timeout 100 python -m benchmarks run --problems public,paper_sweeps --names 2d-nat,2d-dinat,sweep-1d-k127,sweep-2d-k7 \
  --backends fused-triton,unfused,reference --dtypes float32 --check --modes fwd,fwd_bwd --budget-s 0.5 \
  --out "$out/f32" > "$out/f32.log" 2>&1
echo "f32 bench rc $?"
for sn in public:2d-nat paper_sweeps:sweep-1d-k3 paper_sweeps:sweep-2d-k7; do
  n=${sn#*:}
  timeout 70 python -m jna.tuning --backend fused-triton --problems ${sn%%:*} --names $n \
    --shapes-per-class 6 --budget-s 0.2 --dry-run > "$out/tune_$n.log" 2>&1
  echo "tune $n rc $?: $(grep -E ': best' "$out/tune_$n.log" | tail -1)"
done
timeout 90 python -m benchmarks profile-call --problems public,paper_sweeps --names 2d-nat,2d-dinat,sweep-1d-k3 \
  --backends fused-triton --modes fwd,fwd_bwd --iters 20 --out "$out/profile" > "$out/profile.log" 2>&1
echo "profile rc $?"; grep "^|" "$out/profile/call_profile.md" | head -12 | cut -c1-220
grep "^|" "$out/bf16/bench.md" | cut -d'|' -f2-4,5,9,10 
grep "^|" "$out/f32/bench.md" | cut -d'|' -f2-4,5,9,10,14
