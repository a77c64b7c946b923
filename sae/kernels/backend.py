"""Choosing the implementation of the sparse primitives: "triton" or "torch".

resolve_backend makes the choice once, from an explicit argument or else from the device
(Triton on CUDA, torch elsewhere); callers pass the resolved name down. Triton runs on the
CPU only under its interpreter (TRITON_INTERPRET=1, set before triton is imported), which
tests use with an explicit backend="triton". Both backends expose gather_sum, gather_dot
and feature_scatter with one signature (sae.kernels.torch_sparse documents them).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from sae.errors import SAEError

BACKENDS = ("triton", "torch")


def resolve_backend(device: torch.device | str, backend: str | None = None) -> str:
    """backend itself when given (checked), else "triton" for a CUDA device and "torch" otherwise."""
    if backend is None:
        return "triton" if torch.device(device).type == "cuda" else "torch"
    if backend not in BACKENDS:
        raise SAEError(f'unknown `backend="{backend}"`: choose one of {", ".join(BACKENDS)} (or None: by the device)')
    return backend


def _triton_feature_scatter(indices, coef, src, out, coef_sum=None) -> None:
    from sae.kernels.triton_scatter import feature_scatter, sort_pairs_by_feature

    order, offsets = sort_pairs_by_feature(indices, out.shape[0])
    feature_scatter(order, offsets, indices.shape[1], coef.contiguous(), src.contiguous(), out, coef_sum)


def sparse_ops(backend: str) -> SimpleNamespace:
    """The namespace of primitives for one (resolved) backend."""
    if backend == "triton":
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
