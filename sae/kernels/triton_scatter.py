"""Triton kernel for the sparse-transpose-dense product: per-feature accumulation.

out[f] = sum over kept pairs (b, j) with indices[b, j] == f of coef[b, j] * src[b]
This is dW_dec (coef = values, src = grad of x_hat) and dW_enc^T (coef = grad of the
kept pre-activations, src = centred input). The B*k pairs are sorted by feature once
(torch.sort, no host sync); each program sums one run of at most CHUNK pairs of one
feature over one D block, so the work is balanced however unevenly the features are
picked. A feature with one run is written once (deterministic); the runs of a busier
feature are added atomically. Features with no pair get an exact zero row. Optionally
also writes coef_sum[f] = sum of coef over the feature's pairs (db_enc).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sae.kernels.checks import require


@triton.jit
def _feature_scatter_kernel(
    order_ptr, offsets_ptr, item_feature_ptr, item_chunk_ptr, item_shared_ptr, coef_ptr, src_ptr, out_ptr, coef_sum_ptr,
    F, K, D, stride_src, stride_of, stride_od,
    CHUNK: tl.constexpr, WRITE_COEF_SUM: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    item = tl.program_id(0)
    dblk = tl.program_id(1)
    feat = tl.load(item_feature_ptr + item)
    if feat < F:
        offs_d = dblk * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        start = tl.load(offsets_ptr + feat) + tl.load(item_chunk_ptr + item) * CHUNK
        end = tl.minimum(tl.load(offsets_ptr + feat + 1), start + CHUNK)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        csum = tl.zeros([BLOCK_P], dtype=tl.float32)
        for p0 in range(start, end, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            mask_p = offs_p < end
            pair = tl.load(order_ptr + offs_p, mask=mask_p, other=0)
            row = pair // K
            c = tl.load(coef_ptr + pair, mask=mask_p, other=0.0).to(tl.float32)
            s = tl.load(
                src_ptr + row[:, None] * stride_src + offs_d[None, :],
                mask=mask_p[:, None] & mask_d[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(s * c[:, None], axis=0)
            csum += c
        out_at = out_ptr + feat * stride_of + offs_d * stride_od
        if tl.load(item_shared_ptr + item):
            tl.atomic_add(out_at, acc, mask=mask_d)
            if WRITE_COEF_SUM:
                if dblk == 0:
                    tl.atomic_add(coef_sum_ptr + feat, tl.sum(csum, axis=0))
        else:
            tl.store(out_at, acc.to(out_ptr.dtype.element_ty), mask=mask_d)
            if WRITE_COEF_SUM:
                if dblk == 0:
                    tl.store(coef_sum_ptr + feat, tl.sum(csum, axis=0).to(coef_sum_ptr.dtype.element_ty))


def sort_pairs_by_feature(indices: torch.Tensor, n_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, offsets): flat pair ids sorted by feature, and offsets[f]:offsets[f+1] the
    slice of order holding feature f. searchsorted instead of bincount: no host sync.
    The narrowest keys that hold the feature ids: the radix sort makes one pass per byte."""
    key_dtype = next(d for d in (torch.int16, torch.int32, torch.int64) if n_features <= torch.iinfo(d).max)
    sorted_feat, order = torch.sort(indices.reshape(-1).to(key_dtype))
    bounds = torch.arange(n_features + 1, device=indices.device, dtype=key_dtype)
    offsets = torch.searchsorted(sorted_feat, bounds)
    return order, offsets


def split_features(offsets: torch.Tensor, n_pairs: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The scatter's work items: each feature's sorted pairs cut into runs of at most
    `chunk`, so a feature that half the batch picks is summed by many programs, not one.

    Returns (feature, chunk_index, shared) per item, on the device and without a host sync:
    the grid is the bound F + ceil(n_pairs / chunk) and items past the real count carry
    feature F (the kernel skips them). A feature with no pair still gets one item (its zero
    row); `shared` marks the items of features cut into more than one run."""
    n_features = offsets.numel() - 1
    counts = offsets[1:] - offsets[:-1]
    n_items = ((counts + chunk - 1) // chunk).clamp(min=1)
    ends = n_items.cumsum(0)
    item = torch.arange(n_features + -(-n_pairs // chunk), device=offsets.device)
    feature = torch.searchsorted(ends, item, right=True)
    owner = feature.clamp(max=n_features - 1)
    return feature, item - (ends[owner] - n_items[owner]), n_items[owner] > 1


def feature_scatter(
    order: torch.Tensor,
    offsets: torch.Tensor,
    k: int,
    coef: torch.Tensor,
    src: torch.Tensor,
    out: torch.Tensor,
    coef_sum: torch.Tensor | None = None,
    block_d: int = 1024,
    block_p: int = 8,
    num_warps: int = 4,
    chunk: int = 256,
) -> None:
    """Fill out [F, D] (any strides) with out[f] = sum_{pairs of f} coef * src[row]; if
    coef_sum [F] is given, fill it with the per-feature sum of coef.

    A feature's pairs are summed in runs of `chunk` (split_features): one program per run
    and D block. A feature with a single run is written once, deterministically; the runs
    of a feature with more pairs than `chunk` (the few features an auxiliary loss hands to
    every token) are added atomically into a zeroed float32 row, so no program's serial
    loop is longer than `chunk` pairs however skewed the features are. Outputs that are not
    float32 are written in single runs (atomics need float32)."""
    F, D = out.shape
    if F == 0 or D == 0:
        return
    require(src.stride(1) == 1, "`src` must have contiguous rows")
    can_share = out.dtype == torch.float32 and (coef_sum is None or coef_sum.dtype == torch.float32)
    chunk = chunk if can_share else 1 << 40
    feature, chunk_index, shared = split_features(offsets, coef.numel(), chunk)
    if can_share:
        out.zero_()
        if coef_sum is not None:
            coef_sum.zero_()
    block_d = min(triton.next_power_of_2(D), block_d)
    _feature_scatter_kernel[(feature.numel(), triton.cdiv(D, block_d))](
        order, offsets, feature, chunk_index, shared, coef.reshape(-1), src, out,
        coef_sum if coef_sum is not None else out,
        F, k, D, src.stride(0), out.stride(0), out.stride(1),
        CHUNK=chunk, WRITE_COEF_SUM=coef_sum is not None, BLOCK_P=block_p, BLOCK_D=block_d, num_warps=num_warps,
    )
