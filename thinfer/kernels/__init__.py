"""Triton kernels for the GPU fast path, each beside the torch function it must match.

Kernels run on CUDA tensors; on a CPU-only machine their tests run them through Triton's
interpreter (`TRITON_INTERPRET=1`, set before the kernel modules are imported).
"""
