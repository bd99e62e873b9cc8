#!/usr/bin/env bash
# Issue 18 (and 16's re-check) on the GPU, from the checkout, in one device call:
#   1. the GPU test subset: rpb (every rpb backend: oracle incl. d_rpb, half precision, d_rpb
#      determinism), fused-triton (key-region walk, grouped layout, oracle sweep, forward mode)
#   2. fused RPB layers against fused without RPB and unfused RPB (`python -m benchmarks rpb`)
#   3. the NAT/DiNAT classifier's training step: fused RPB, unfused RPB, fused without RPB,
#      dense cuDNN attention (examples/nat_classifier), one process each (peak memory per model)
#   4. the small-window problems with the default (tuned) configs (`region-walk --top 0`)
#   scripts/gpu_rpb.sh OUT_DIR
# Knobs (environment): TESTS (pytest paths and flags, default the subset above), RPB_ARGS (more
# `benchmarks rpb` flags, e.g. "--names 2d-nat --variants fused-triton,fused-triton+rpb"),
# MODELS (space-separated variant names of step 3, default all four), REGION=0 skips step 4.
set -uo pipefail
out=${1:?OUT_DIR}
source "$(dirname "$0")/gpu_preamble.sh"
default_tests="jna_tests/test_rpb*.py jna_tests/test_key_region.py jna_tests/test_grouped_layout.py \
  jna_tests/test_backend_fused_triton.py jna_tests/test_gpu.py jna_tests/test_forward_mode.py"
timeout ${TEST_TIMEOUT:-240} python -m pytest -q -p no:cacheprovider -n 8 ${TESTS:-$default_tests} \
  -k "not simulator" > "$out/tests.log" 2>&1
echo "tests rc $?: $(tail -1 "$out/tests.log")"
grep -E "^(FAILED|ERROR)" "$out/tests.log" | head -20
timeout ${RPB_TIMEOUT:-150} python -m benchmarks rpb ${RPB_ARGS:-} --out "$out" > "$out/rpb_bench.log" 2>&1
echo "rpb bench rc $?"; grep "^|" "$out/rpb_bench.md" 2>/dev/null || tail -5 "$out/rpb_bench.log"
common="--image-size 224 --embed-dim 64 --heads 2,4 --kernel-size 7 --batch ${MODEL_BATCH:-128} --steps 30 --log-every 10 --dtype bfloat16"
for variant in "fused-rpb:--backend fused-triton" "fused-no-rpb:--backend fused-triton --no-rpb" \
               "unfused-rpb:--backend unfused" "dense-cudnn-rpb:--attention dense --dense-implementation cudnn" \
               ${MOSAIC_RPB:+"mosaic-rpb:--backend fused-mosaic"}; do
  name=${variant%%:*}; flags=${variant#*:}
  if [ -n "${MODELS:-}" ] && [[ " $MODELS " != *" $name "* ]]; then continue; fi
  timeout ${MODEL_TIMEOUT:-60} python -m examples.nat_classifier.train $common $flags > "$out/model_$name.log" 2>&1
  echo "model $name rc $?: $(tail -1 "$out/model_$name.log" | python scripts/model_summary.py)"
done
[ "${REGION:-1}" = 0 ] && exit 0
timeout ${REGION_TIMEOUT:-100} python -m benchmarks region-walk --top 0 \
  --names 2d-nat,2d-dinat,sweep-1d-k3,sweep-1d-k127,sweep-2d-k3,sweep-2d-k7,sweep-2d-k13,sweep-3d-k7 \
  --out "$out" > "$out/region_walk.log" 2>&1
echo "defaults rc $?"; grep "^|" "$out/region_walk.md" 2>/dev/null | head -30
