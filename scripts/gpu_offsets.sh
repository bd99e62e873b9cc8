#!/usr/bin/env bash
# Query offsets / spatial sharding (issue 17) on ONE GPU, from the checkout (no install): the
# query-offset tests on real fused-triton kernels, bench_sharding on a one-device mesh (the
# sharded code path's overhead), then the per-shard compute of the offset and slab routes against
# the unsharded call (benchmarks/shard_compute.py: predicted compute-only efficiency, halo bytes).
#   scripts/gpu_offsets.sh OUT_DIR
# Leaves 7 files in OUT_DIR: device.txt, query_offsets_tests.log, run.log (the benchmarks' logs),
# bench_sharding.{json,md}, shard_compute.{json,md}. Timeouts add up to 500 s; on an H200 (2026-12-01)
# the tests took ~40 s, shard_compute ~165 s, bench_sharding ~190 s (mostly Triton compiles).
set -uo pipefail
out=${1:?OUT_DIR}
source "$(dirname "$0")/gpu_preamble.sh"
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" | tee -a "$out/device.txt"

timeout 90 python -m pytest -q -p no:cacheprovider -n 4 jna_tests/test_query_offsets.py \
  > "$out/query_offsets_tests.log" 2>&1
echo "query-offset tests rc $?: $(tail -1 "$out/query_offsets_tests.log")"
grep -E "^(FAILED|ERROR)" "$out/query_offsets_tests.log" | head -20

echo "== bench_sharding (1 GPU, fused-triton)" >> "$out/run.log"
timeout 210 python -m benchmarks.bench_sharding --out "$out" --gpus 1 --backend fused-triton \
  --problems 2d-flux,3d-hunyuan --batch 2 --repeats 5 >> "$out/run.log" 2>&1
echo "bench_sharding rc $?"; grep "^|" "$out/bench_sharding.md" 2>/dev/null | cut -c1-220

echo "== shard_compute" >> "$out/run.log"
timeout 200 python -m benchmarks.shard_compute --out "$out" --problems 2d-flux,3d-hunyuan \
  --shards 2,4,8 --repeats 5 >> "$out/run.log" 2>&1
echo "shard_compute rc $?"; cat "$out/shard_compute.md" 2>/dev/null
grep -E "FAIL|Error|error" "$out/run.log" | head -20
ls "$out"
