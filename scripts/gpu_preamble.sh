# Sourced by the scripts/gpu_*.sh runs after they set `out`: creates it, sets the environment of
# a device run (the checkout on PYTHONPATH, unbuffered output, no whole-GPU preallocation, so
# that several test workers share the GPU) and records the device and jax in $out/device.txt.
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/device.txt"
python -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$out/device.txt"
