#!/usr/bin/env bash
# Issue 16, fused-triton's per-tile work (cheaper mask, scale folded into the exponent, masking
# chosen per walk, containment triggered by the output tile): the fused-triton GPU test subset,
# then every problem's default config timed after and, with OLD (a directory holding an older
# checkout's jna/ and configs/), before, in the same session; the issue 16/18 problems with rpb.
#   OLD=exp/old scripts/gpu_mask_work.sh OUT_DIR
# Knobs: TESTS=0 (no tests), TEST_FILES (default: the fused-triton subset below), NAMES /
# RPB_NAMES (empty: skip that bench), AFTER=0 (only the old checkout), TEST_S / BENCH_S (timeouts).
set -uo pipefail
out=${1:?OUT_DIR}
source scripts/gpu_preamble.sh
[ "${TESTS:-1}" = 1 ] && JNA_TEST_BACKENDS=fused-triton timeout ${TEST_S:-220} python -m pytest -q -p no:cacheprovider -n 8 \
  ${TEST_FILES:-jna_tests/test_backend_fused_triton.py jna_tests/test_gpu.py jna_tests/test_key_region.py \
  jna_tests/test_containment.py jna_tests/test_walk_masking.py jna_tests/test_rpb_fused.py \
  jna_tests/test_grouped_layout.py} -k "not simulator and not mosaic" > "$out/gpu_tests.log" 2>&1
echo "gpu tests rc $?: $(tail -1 "$out/gpu_tests.log")"
grep -E "^(FAILED|ERROR)" "$out/gpu_tests.log" 2>/dev/null | head -10
names=${NAMES-2d-nat,2d-dinat,sweep-1d-k3,sweep-1d-k127,sweep-2d-k3,sweep-2d-k7,sweep-2d-k13,sweep-3d-k7,2d-flux,3d-hunyuan}
rpb_names=${RPB_NAMES-2d-nat,2d-dinat,2d-flux}
root=$PWD
bench() {  # checkout label names [--rpb]: run from the checkout (`python -m` puts the current
  # directory first on sys.path, so its jna is the one imported; benchmarks/ comes from here)
  (cd "$1" && PYTHONPATH=$root timeout ${BENCH_S:-150} python -m benchmarks mask-work --label "$2" \
    --names "$3" ${4:-} --out "$out/mask_work.jsonl" > /dev/null 2>> "$out/bench.err")
  echo "$2 ${4:-} rc $?"
}
if [ -n "$names" ]; then  # NAMES= (empty): none
  [ -n "${OLD:-}" ] && bench "$root/$OLD" before "$names"
  [ "${AFTER:-1}" = 1 ] && bench "$root" after "$names"
fi
if [ -n "$rpb_names" ]; then
  [ -n "${OLD:-}" ] && bench "$root/$OLD" before "$rpb_names" --rpb
  [ "${AFTER:-1}" = 1 ] && bench "$root" after "$rpb_names" --rpb
fi
python - "$out/mask_work.jsonl" <<'PY'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    rows.setdefault((r["problem"], r["rpb"]), {})[r["variant"]] = r
print("| problem | rpb | before fwd / fwd+bwd ms | after fwd / fwd+bwd ms | after/before | floor |")
print("|---|---|---|---|---|---|")
for (name, rpb), v in rows.items():
    b, a = v.get("before"), v.get("after")
    cell = lambda r: f"{r['fwd_ms']:.4g} / {r['fwd_bwd_ms']:.4g}" if r else "-"
    ratio = f"{a['fwd_ms'] / b['fwd_ms']:.2f} / {a['fwd_bwd_ms'] / b['fwd_bwd_ms']:.2f}" if a and b else "-"
    floor = "{:.3g} / {:.3g}".format(*(a or b)["floor_ms"])
    print(f"| {name} | {rpb} | {cell(b)} | {cell(a)} | {ratio} | {floor} |")
PY
grep -E "^[A-Za-z]*Error" "$out/bench.err" | sort | uniq -c | head
