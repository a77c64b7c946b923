"""The autograd-aware sparse decoder, dispatching to Triton on CUDA and plain torch on CPU."""

from __future__ import annotations

import os

import torch

from sae.kernels.torch_decode import decode_backward_torch, decode_forward_torch


def use_triton(device: torch.device, force: bool | None = None) -> bool:
    """Triton on CUDA tensors; on CPU only when forced (WORKBENCH_FORCE_TRITON=1, for
    tests under TRITON_INTERPRET=1)."""
    if force is not None:
        return force
    if os.environ.get("WORKBENCH_FORCE_TRITON") == "1":
        return True
    return device.type == "cuda"


class SparseDecode(torch.autograd.Function):
    """x_hat = sum_j values[:, j] * W_dec[indices[:, j]], grads for values and W_dec."""

    @staticmethod
    def forward(ctx, indices, values, W_dec, triton_path: bool):
        ctx.save_for_backward(indices, values, W_dec)
        ctx.triton_path = triton_path
        if triton_path:
            from sae.kernels.triton_decode import decode_forward_triton

            return decode_forward_triton(indices, values, W_dec)
        return decode_forward_torch(indices, values, W_dec)

    @staticmethod
    def backward(ctx, grad_out):
        indices, values, W_dec = ctx.saved_tensors
        if ctx.triton_path:
            from sae.kernels.triton_decode import decode_backward_triton

            d_values, d_W = decode_backward_triton(grad_out.contiguous(), indices, values, W_dec)
        else:
            d_values, d_W = decode_backward_torch(grad_out, indices, values, W_dec)
        return None, d_values, d_W, None


def sparse_decode(
    indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor, force_triton: bool | None = None
) -> torch.Tensor:
    """Decode k sparse codes per row: indices LongTensor[B, k], values [B, k], W_dec
    [d_sae, d_in] -> [B, d_in]. Padding entries (value 0, any valid index) contribute
    nothing to the output or to dW_dec."""
    triton_path = use_triton(W_dec.device, force_triton)
    return SparseDecode.apply(indices.contiguous(), values.contiguous(), W_dec, triton_path)
