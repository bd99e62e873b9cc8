"""The Mosaic GPU backend, fused-mosaic (Hopper sm90; the Mosaic GPU simulator on a CPU):
``op`` (the backend: configs, the differentiable op, GPU lowering), ``common`` (config, plan
geometry and helpers shared by the kernels), ``forward`` and ``backward`` (the kernels)."""
