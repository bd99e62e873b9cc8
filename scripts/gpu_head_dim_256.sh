#!/usr/bin/env bash
# fused-mosaic at head dim 256 on a Hopper GPU, from the checkout (no install): the GPU test
# subset for fused-mosaic (oracle sweep incl. D=256 draws, large shapes at D=256 against the
# reference, determinism, > 2^31 elements), then the D=256 problems timed against fused-triton
# and cuDNN dense attention (configs/problems/head_dim_256.json).
#   scripts/gpu_head_dim_256.sh OUT_DIR [pytest workers]
set -uo pipefail
out=${1:?OUT_DIR}; workers=${2:-8}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/device.txt"
python -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$out/device.txt"
XLA_PYTHON_CLIENT_PREALLOCATE=false JNA_TEST_BACKENDS=fused-mosaic timeout 300 python -m pytest -q \
  -p no:cacheprovider -n "$workers" jna_tests/test_backend_fused_mosaic.py jna_tests/test_gpu.py \
  > "$out/gpu_tests.log" 2>&1
echo "gpu tests rc $?: $(tail -1 "$out/gpu_tests.log")"
grep -E "^(FAILED|ERROR)" "$out/gpu_tests.log" | head -20
timeout 240 python -m benchmarks run --problems configs/problems/head_dim_256.json \
  --backends fused-mosaic,fused-triton --modes fwd,fwd_bwd --budget-s 1 --out "$out/d256" \
  > "$out/d256.log" 2>&1
echo "d256 bench rc $?"; tail -30 "$out/d256.log"
