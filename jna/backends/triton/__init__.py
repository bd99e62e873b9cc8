"""The Pallas Triton backends (NVIDIA sm80+; interpret mode on a CPU): ``fused`` (fused-triton:
flash-style fused NA) and ``unfused`` (QK / softmax / AV kernels exposing the weights)."""
