"""Backends implementing the ops of ops/: cpu (gloo, the reference algorithm run for real
across processes) and cuda (the kernels of csrc/, registered by the compiled extension)."""
