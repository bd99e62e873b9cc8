#!/usr/bin/env bash
# fused-triton's grouped layout (issue 16) on the GPU, from the checkout (no install): its tests
# on real kernels plus the fused-triton GPU subset, then the layouts side by side on the small
# dilated / ragged layers (direct_layout false = permuted copies, true = grouped in place), and the
# 2d-nat / 2d-dinat rows of the benchmark with their memory floors.
#   scripts/gpu_grouped_layout.sh OUT_DIR
set -uo pipefail
out=${1:?OUT_DIR}
source "$(dirname "$0")/gpu_preamble.sh"
git rev-parse --short HEAD 2>/dev/null | tee -a "$out/device.txt"
JNA_TEST_BACKENDS=fused-triton timeout 220 python -m pytest -q -p no:cacheprovider -n 8 \
  jna_tests/test_grouped_layout.py jna_tests/test_backend_fused_triton.py jna_tests/test_gpu.py \
  jna_tests/test_forward_mode.py jna_tests/test_query_offsets.py -k "not simulator and not mosaic" \
  > "$out/tests.log" 2>&1
echo "tests rc $?: $(tail -1 "$out/tests.log")"
grep -E "^(FAILED|ERROR)" "$out/tests.log" | head -20
names=2d-dinat,nat-tiny-s2,nat-tiny-s3,dinat-tiny-s1,dinat-tiny-s2,dinat-tiny-s3,dinat-large-s1-k11
mkdir -p "$out/variants"
for mode in fwd fwd_bwd; do
  timeout 110 python -m benchmarks variants --backend fused-triton --field direct_layout --values false,true \
    --sets public,models --problems "$names" --mode "$mode" --budget-s 1 --out "$out/variants" \
    > "$out/variants/$mode.log" 2>&1
  echo "variants $mode rc $?"; grep "^|" "$out/variants/variants_fused-triton_direct_layout_$mode.md"
done
tar -C "$out" -czf "$out/variants.tgz" variants && rm -rf "$out/variants"
timeout 110 python -m benchmarks run --problems public --names 2d-nat,2d-dinat --backends auto,fused-triton \
  --modes fwd,fwd_bwd --budget-s 1 --out "$out/bench" > "$out/bench.log" 2>&1
echo "bench rc $?"; grep "^|" "$out/bench/bench.md" | cut -c1-220
cp "$out/bench/bench.md" "$out/bench.md" 2>/dev/null; tar -C "$out" -czf "$out/bench.tgz" bench && rm -rf "$out/bench"
