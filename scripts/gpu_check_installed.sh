#!/usr/bin/env bash
# On a GPU machine: jna installed from its wheel, as a user has it, then the GPU checks.
#   1. install the wheel (no dependencies: the machine's jax, flax, chex are used) into a
#      site-packages of its own; optionally put another jax first on the path (JAX_SITE);
#   2. from a copy of jna_tests outside the checkout: jna.explain for every public problem (the
#      tuned table must be found inside the installed package), then the smoke tier, the x64,
#      module and converter tests on the GPU;
#   3. unless SKIP_GPU_CHECK=1: benchmarks/gpu_check.py from the checkout (the GPU test subset
#      and the benchmark table), with the arguments given after the wheel.
# Usage: scripts/gpu_check_installed.sh OUT_DIR WHEEL [gpu_check.py args...]
set -uo pipefail
out=$1 wheel=$2
shift 2
root=$(cd "$(dirname "$0")/.." && pwd)
site=/tmp/jna_installed/site-packages
rm -rf /tmp/jna_installed /tmp/jna_suite && mkdir -p "$site" /tmp/jna_suite "$out"
python3 -m pip install -q --no-deps --no-index --no-compile --target "$site" "$wheel" || exit 1
export PYTHONPATH="${JAX_SITE:+$JAX_SITE:}$site"
cp -r "$root/jna_tests" /tmp/jna_suite/
cd /tmp/jna_suite
python3 - <<'PY' 2>&1 | tee "$out/explain.log"
import jax, jax.numpy as jnp, jna
from jna.tuning import problem_sets
print(f"jax {jax.__version__}, jna from {jna.__file__}, device {jax.devices()[0].device_kind}")
for p in problem_sets.load("public"):
    spec = jax.ShapeDtypeStruct((p.batch, *p.shape, p.heads, p.head_dim), jnp.bfloat16)
    e = jna.explain(spec, spec, spec, **p.na_kwargs)
    print(f"{p.name:15s} {e.backend:13s} {e.config} ({e.config_source})")
PY
JNA_SMOKE_INSTALLED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false python3 -m pytest -q -p no:cacheprovider \
  -n 8 jna_tests/test_smoke.py jna_tests/test_x64.py jna_tests/test_nnx.py \
  jna_tests/test_natten_weights.py jna_tests/test_modules.py 2>&1 | tee "$out/installed_tests.log" | tail -15
cd "$root"
if [ "${SKIP_GPU_CHECK:-0}" != 1 ]; then
  PYTHONPATH="${JAX_SITE:-}" python3 -m benchmarks gpu-check --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log" | tail -40
fi
