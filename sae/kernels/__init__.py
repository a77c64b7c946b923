"""Fused sparse kernels for SAE training: Triton on CUDA, plain torch on CPU."""

from sae.kernels.decode import sparse_decode

__all__ = ["sparse_decode"]
