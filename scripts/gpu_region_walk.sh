#!/usr/bin/env bash
# fused-triton's key-region walk (issue 16) on the GPU, from the checkout (no install): its tests
# on real kernels (oracle, half precision, determinism) plus the fused-triton GPU subset, then the
# region walk against the aligned KV tiles on the small-window problems (`benchmarks/region_walk.py`).
#   scripts/gpu_region_walk.sh OUT_DIR
set -uo pipefail
out=${1:?OUT_DIR}
source "$(dirname "$0")/gpu_preamble.sh"
git rev-parse --short HEAD 2>/dev/null | tee -a "$out/device.txt"
JNA_TEST_BACKENDS=fused-triton timeout 230 python -m pytest -q -p no:cacheprovider -n 8 \
  jna_tests/test_key_region.py jna_tests/test_grouped_layout.py jna_tests/test_backend_fused_triton.py \
  jna_tests/test_gpu.py jna_tests/test_forward_mode.py -k "not simulator and not mosaic" \
  > "$out/tests.log" 2>&1
echo "tests rc $?: $(tail -1 "$out/tests.log")"
grep -E "^(FAILED|ERROR)" "$out/tests.log" | head -20
timeout ${REGION_TIMEOUT:-330} python -m benchmarks region-walk --top ${REGION_TOP:-2} ${REGION_NAMES:+--names $REGION_NAMES} \
  --out "$out" > "$out/region_walk.log" 2>&1
echo "region-walk rc $?"
grep "^|" "$out/region_walk.md" 2>/dev/null || tail -5 "$out/region_walk.log"
