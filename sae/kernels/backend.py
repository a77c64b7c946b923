"""Choosing the implementation of the sparse primitives: Triton on CUDA, torch on CPU.

Both backends expose gather_sum, gather_dot and feature_scatter with one signature
(sae.kernels.torch_sparse documents them). Triton can be forced on CPU, where it runs
under TRITON_INTERPRET=1, by an argument or WORKBENCH_FORCE_TRITON=1.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch


def use_triton(device: torch.device, force: bool | None = None) -> bool:
    """Triton for CUDA tensors; for CPU tensors only when forced."""
    if force is not None:
        return force
    if os.environ.get("WORKBENCH_FORCE_TRITON") == "1":
        return True
    return device.type == "cuda"


def _triton_feature_scatter(indices, coef, src, out, coef_sum=None) -> None:
    from sae.kernels.triton_scatter import feature_scatter, sort_pairs_by_feature

    order, offsets = sort_pairs_by_feature(indices, out.shape[0])
    feature_scatter(order, offsets, indices.shape[1], coef.contiguous(), src.contiguous(), out, coef_sum)


def sparse_ops(triton_path: bool) -> SimpleNamespace:
    """The namespace of primitives for one backend."""
    if triton_path:
        from sae.kernels import triton_gather

        return SimpleNamespace(
            gather_sum=triton_gather.gather_sum,
            gather_dot=triton_gather.gather_dot,
            feature_scatter=_triton_feature_scatter,
        )
    from sae.kernels import torch_sparse

    return SimpleNamespace(
        gather_sum=torch_sparse.gather_sum,
        gather_dot=torch_sparse.gather_dot,
        feature_scatter=torch_sparse.feature_scatter,
    )
