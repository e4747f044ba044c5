"""Fused ops: Triton kernels with hand-written backward passes, each with a PyTorch reference."""
