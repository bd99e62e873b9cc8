"""jna's internal modules: not public API (names and signatures may change between releases).

  arguments: validation of a call into an `NAProblem` (shapes, dtypes, per-axis parameters).
  plan: the tile plan the fused kernels read (per-axis visit ranges, full flags, permutations).
  compat: the one module that looks at jax's version (private hooks across the supported range).
  resources: the package data (``jna.configs``) and the user's cache directory.
  dense: dense attention, the reference's building block and the benchmarks' baseline.
  finite: the all-finite check that picks a fused kernel's fast path.
  forward_mode: `jax.jvp` through the fused ops (custom JVP; reverse mode by transposition).
  rpb: the relative positional bias table expanded to every (query, window slot).
  rpb_tiles: the bias as one block per tile-offset class of a plan (fused-mosaic), and its
    deterministic adjoint.

The public API is what ``jna``, ``jna.backends``, ``jna.nn``, ``jna.nnx``, ``jna.semantics``,
``jna.sharding``, ``jna.qk_av``, ``jna.merge``, ``jna.natten_weights``, ``jna.explain`` and
``jna.tuning`` export.
"""
