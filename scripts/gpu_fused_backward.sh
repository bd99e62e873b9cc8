#!/usr/bin/env bash
# fused-mosaic's one-kernel backward on a Hopper GPU, from the checkout (no install):
# a smoke run (one problem, bounded in time: a kernel that waited forever would show here),
# the GPU test subset for fused-mosaic (oracle sweep, large shapes, determinism, > 2^31
# elements), and the backward variants side by side (python -m benchmarks variants).
#   scripts/gpu_fused_backward.sh OUT_DIR [pytest workers]
set -uo pipefail
out=${1:?OUT_DIR}; workers=${2:-8}
source "$(dirname "$0")/gpu_preamble.sh"
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" | tee -a "$out/device.txt"
if ! timeout 180 python -m benchmarks variants --problems 2d-flux-gna --budget-s 1 > "$out/smoke.log" 2>&1; then
  echo "smoke run failed or timed out"; tail -40 "$out/smoke.log"; exit 1
fi
tail -4 "$out/smoke.log"
JNA_TEST_BACKENDS=fused-mosaic timeout 300 python -m pytest -q -p no:cacheprovider -n "$workers" \
  jna_tests/test_backend_fused_mosaic.py jna_tests/test_gpu.py > "$out/gpu_tests.log" 2>&1
echo "gpu tests rc $?: $(tail -1 "$out/gpu_tests.log")"
grep -E "^(FAILED|ERROR)" "$out/gpu_tests.log" | head -20
timeout 240 python -m benchmarks variants --out "$out" > "$out/backward.log" 2>&1
echo "backward rc $?"; tail -12 "$out/backward.log"
