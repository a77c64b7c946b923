"""Per-row top-k in one pass over z: a bisection on the float's bit pattern, in registers.

Each program holds one row of z (up to MAX_ROW columns) in registers, maps every value to
an integer key with the same order (sign-magnitude -> two's complement), and bisects the
key range for the k-th largest key t: 16 rounds of "count keys >= mid" for bf16/fp16,
32 for fp32, each a register compare and a block reduction. It then writes the entries
with key > t and the first (k - count(key > t)) entries with key == t to positions given
by prefix sums: exactly k per row, no sort, and z is read from memory once (torch.topk
reads and partially sorts it). Values are ReLU(z) (the TopK contract of sae.kernels.encode).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Longest row held in registers; longer rows use torch.topk.
MAX_ROW = 65536


@triton.jit
def _row_topk_kernel(
    z_ptr, val_ptr, idx_ptr, N, stride_z, K,
    KEY_BITS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    z = tl.load(z_ptr + row.to(tl.int64) * stride_z + cols, mask=mask, other=float("-inf"))
    if KEY_BITS == 16:
        bits = z.to(tl.int16, bitcast=True).to(tl.int32)
        key = tl.where(bits < 0, bits ^ 0x7FFF, bits)
        lo = tl.full([], -32768, tl.int32)
        hi = tl.full([], 32767, tl.int32)
    else:
        bits = z.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        lo = tl.full([], -2147483648, tl.int64)
        hi = tl.full([], 2147483647, tl.int64)
    key = tl.where(mask, key, -2147483647 - 1)
    # invariant: count(key >= lo) >= K and count(key > hi) < K
    for _ in range(KEY_BITS):
        mid = (lo + hi + 1) >> 1
        cnt = tl.sum((key >= mid).to(tl.int32), axis=0)
        take = cnt >= K
        lo = tl.where(take, mid, lo)
        hi = tl.where(take, hi, mid - 1)
    above = key > lo
    n_above = tl.sum(above.to(tl.int32), axis=0)
    tie = (key == lo) & mask
    tie_rank = tl.cumsum(tie.to(tl.int32), axis=0)
    keep_tie = tie & (tie_rank <= K - n_above)
    pos = tl.where(above, tl.cumsum(above.to(tl.int32), axis=0) - 1, n_above + tie_rank - 1)
    keep = above | keep_tie
    out = row.to(tl.int64) * K + pos
    tl.store(val_ptr + out, tl.maximum(z.to(tl.float32), 0.0), mask=keep)
    tl.store(idx_ptr + out, cols.to(tl.int64), mask=keep)


@triton.jit
def _keys(z, mask, KEY_BITS: tl.constexpr):
    if KEY_BITS == 16:
        bits = z.to(tl.int16, bitcast=True).to(tl.int32)
        key = tl.where(bits < 0, bits ^ 0x7FFF, bits)
    else:
        bits = z.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(mask, key, -2147483647 - 1)


@triton.jit
def _row_topk_chunked_kernel(
    z_ptr, val_ptr, idx_ptr, N, stride_z, K,
    KEY_BITS: tl.constexpr, CHUNK: tl.constexpr,
):
    """The same bisection, streaming the row in CHUNK-wide pieces (the row stays in L1/L2
    between passes), so any row length fits and blocks stay small."""
    row = tl.program_id(0)
    base = z_ptr + row.to(tl.int64) * stride_z
    if KEY_BITS == 16:
        lo = tl.full([], -32768, tl.int32)
        hi = tl.full([], 32767, tl.int32)
    else:
        lo = tl.full([], -2147483648, tl.int64)
        hi = tl.full([], 2147483647, tl.int64)
    for _ in range(KEY_BITS):
        mid = (lo + hi + 1) >> 1
        cnt = tl.zeros([], tl.int32)
        for c0 in range(0, N, CHUNK):
            cols = c0 + tl.arange(0, CHUNK)
            mask = cols < N
            key = _keys(tl.load(base + cols, mask=mask, other=0.0), mask, KEY_BITS)
            cnt += tl.sum((key >= mid).to(tl.int32), axis=0)
        take = cnt >= K
        lo = tl.where(take, mid, lo)
        hi = tl.where(take, hi, mid - 1)
    n_above = tl.zeros([], tl.int32)
    for c0 in range(0, N, CHUNK):
        cols = c0 + tl.arange(0, CHUNK)
        mask = cols < N
        key = _keys(tl.load(base + cols, mask=mask, other=0.0), mask, KEY_BITS)
        n_above += tl.sum((key > lo).to(tl.int32), axis=0)
    out_row = row.to(tl.int64) * K
    seen_above = tl.zeros([], tl.int32)
    seen_tie = tl.zeros([], tl.int32)
    for c0 in range(0, N, CHUNK):
        cols = c0 + tl.arange(0, CHUNK)
        mask = cols < N
        z = tl.load(base + cols, mask=mask, other=0.0)
        key = _keys(z, mask, KEY_BITS)
        above = key > lo
        tie = (key == lo) & mask
        a_rank = seen_above + tl.cumsum(above.to(tl.int32), axis=0)
        t_rank = seen_tie + tl.cumsum(tie.to(tl.int32), axis=0)
        keep_tie = tie & (t_rank <= K - n_above)
        pos = tl.where(above, a_rank - 1, n_above + t_rank - 1)
        keep = above | keep_tie
        tl.store(val_ptr + out_row + pos, tl.maximum(z.to(tl.float32), 0.0), mask=keep)
        tl.store(idx_ptr + out_row + pos, cols.to(tl.int64), mask=keep)
        seen_above += tl.sum(above.to(tl.int32), axis=0)
        seen_tie += tl.sum(tie.to(tl.int32), axis=0)


def row_topk(z: torch.Tensor, k: int, chunk: int | None = None, num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(ReLU values float32 [B, k], indices int64 [B, k]) of the k largest entries per row of
    z (bf16, fp16 or fp32). Ties at the k-th value keep the lowest columns. Order within a
    row is by column among the larger entries, then ties. chunk=None holds the whole row
    in registers (rows up to MAX_ROW); a chunk width streams the row instead."""
    B, N = z.shape
    assert z.stride(1) == 1 and 0 < k <= N and (chunk is not None or N <= MAX_ROW)
    values = torch.empty(B, k, device=z.device, dtype=torch.float32)
    indices = torch.empty(B, k, device=z.device, dtype=torch.int64)
    if B == 0:
        return values, indices
    key_bits = 32 if z.dtype == torch.float32 else 16
    if chunk is not None:
        _row_topk_chunked_kernel[(B,)](z, values, indices, N, z.stride(0), k, KEY_BITS=key_bits, CHUNK=chunk, num_warps=num_warps)
        return values, indices
    block_n = triton.next_power_of_2(N)
    num_warps = max(4, min(32, block_n // 1024))
    _row_topk_kernel[(B,)](z, values, indices, N, z.stride(0), k, KEY_BITS=key_bits, BLOCK_N=block_n, num_warps=num_warps)
    return values, indices
