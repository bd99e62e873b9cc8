#!/usr/bin/env bash
# Forward mode (issue 19) on the GPU, from the checkout (no install): the forward-mode tests on
# real kernels (both fused backends and unfused: jvp, grad of a jvp loss, vmap, determinism),
# then the public problems timed fwd, fwd+bwd and jvp (reverse mode compared with earlier runs).
#   scripts/gpu_forward_mode.sh OUT_DIR [backends] [problem names]
set -uo pipefail
out=${1:?OUT_DIR}; backends=${2:-auto}; names=${3:-}
source "$(dirname "$0")/gpu_preamble.sh"
timeout 240 python -m pytest -q -p no:cacheprovider -n 4 jna_tests/test_forward_mode.py -k "not simulator" \
  > "$out/forward_mode_tests.log" 2>&1
echo "forward-mode tests rc $?: $(tail -1 "$out/forward_mode_tests.log")"
grep -E "^(FAILED|ERROR)" "$out/forward_mode_tests.log" | head -20
timeout 320 python -m benchmarks run --problems public ${names:+--names "$names"} --backends "$backends" \
  --modes fwd,fwd_bwd,jvp --budget-s 1 --out "$out/bench" > "$out/bench.log" 2>&1
echo "bench rc $?"; grep "^|" "$out/bench/bench.md" | cut -c1-200
