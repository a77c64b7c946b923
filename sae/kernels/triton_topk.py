"""Per-row top-k without a sort: bisection on the float's bit pattern, in Triton.

Every value maps to an integer key with the same order (sign-magnitude -> two's
complement). One program owns one row and finds the k-th largest key t by bisection:
16 rounds of "count keys >= mid" for bf16/fp16, 32 for fp32. It then writes the entries
with key > t and the first (k - count(key > t)) entries with key == t, at positions
given by prefix sums: exactly k per row. Values are ReLU(z) (the TopK contract of
sae.kernels.encode); the k-th largest pre-activation of each row is also returned.

Two forms, both exact for any input:
- row_topk(z, k, method="stream"): one program per row streams it in CHUNK-wide pieces for
  every bisection round (the row stays in L1/L2 between rounds): 17 passes over a row.
  "split" falls back to it for the rows where its guess fails.
- method="split" (the default): guess and verify, over three kernels.
  1. One program per row guesses its threshold from a sample (its first 4096 columns:
     feature order is arbitrary, so they are a fair sample), chosen so that about 4k
     columns of the row lie above it: bisection over the maxima of the sample's groups of
     up to 16 columns (a bound from below, and nearly exact), not over the sample.
  2. One program per (row, segment of 1024 columns) appends the segment's columns above
     the guess to the row's candidate buffer (12k, rounded up to a power of two), at
     slots taken by atomic adds. What this pass costs is its masked scatter (issued per
     column, though few are taken), not its reads: counting alone runs at the read
     floor.
  3. One program per row sorts its candidates by column (so the result does not depend on
     the atomics' order), bisects them between the guess and their largest and emits the
     k, in registers; a row with fewer
     than k candidates, or more than the buffer holds, runs the streamed bisection.
The guess is per row, not one for the batch: in training, rows' scales differ.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sae.kernels.checks import require


@triton.jit
def _keys(z, mask, KEY_BITS: tl.constexpr):
    """Order-preserving integer keys; masked entries get the smallest key."""
    if KEY_BITS == 16:
        bits = z.to(tl.int16, bitcast=True).to(tl.int32)
        key = tl.where(bits < 0, bits ^ 0x7FFF, bits)
    else:
        bits = z.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(mask, key, -2147483647 - 1)


@triton.jit
def _key_range(KEY_BITS: tl.constexpr):
    """Bounds of the key range, as int64 scalars (mid = lo + hi + 1 must not overflow)."""
    if KEY_BITS == 16:
        lo = tl.full([], -32768, tl.int64)
        hi = tl.full([], 32767, tl.int64)
    else:
        lo = tl.full([], -2147483648, tl.int64)
        hi = tl.full([], 2147483647, tl.int64)
    return lo, hi


@triton.jit
def _bisect_chunked(base, N, K, KEY_BITS: tl.constexpr, CHUNK: tl.constexpr):
    """The k-th largest key of the row at base (invariant: count(key >= lo) >= K)."""
    lo, hi = _key_range(KEY_BITS)
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
    return lo


@triton.jit
def _emit_chunked(base, N, K, lo, val_ptr, idx_ptr, out_row, KEY_BITS: tl.constexpr, CHUNK: tl.constexpr):
    """Write the entries above lo, then ties at lo up to K in all, to out_row."""
    n_above = tl.zeros([], tl.int32)
    for c0 in range(0, N, CHUNK):
        cols = c0 + tl.arange(0, CHUNK)
        mask = cols < N
        key = _keys(tl.load(base + cols, mask=mask, other=0.0), mask, KEY_BITS)
        n_above += tl.sum((key > lo).to(tl.int32), axis=0)
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
        keep = above | (tie & (t_rank <= K - n_above))
        pos = tl.where(above, a_rank - 1, n_above + t_rank - 1)
        tl.store(val_ptr + out_row + pos, tl.maximum(z.to(tl.float32), 0.0), mask=keep)
        tl.store(idx_ptr + out_row + pos, cols.to(tl.int64), mask=keep)
        seen_above += tl.sum(above.to(tl.int32), axis=0)
        seen_tie += tl.sum(tie.to(tl.int32), axis=0)


@triton.jit
def _key_to_float(key, KEY_BITS: tl.constexpr):
    if KEY_BITS == 16:
        k32 = key.to(tl.int32)
        bits = tl.where(k32 < 0, k32 ^ 0x7FFF, k32).to(tl.int16)
        return bits.to(tl.bfloat16, bitcast=True).to(tl.float32)
    k32 = key.to(tl.int32)
    bits = tl.where(k32 < 0, k32 ^ 0x7FFFFFFF, k32)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _bisect_block(key, K, KEY_BITS: tl.constexpr):
    """The K-th largest of a block of keys held in registers."""
    lo, hi = _key_range(KEY_BITS)
    for _ in range(KEY_BITS):
        mid = ((lo + hi + 1) >> 1).to(tl.int32)
        take = tl.sum((key >= mid).to(tl.int32), axis=0) >= K
        lo = tl.where(take, mid.to(tl.int64), lo)
        hi = tl.where(take, hi, mid.to(tl.int64) - 1)
    return lo


@triton.jit
def _bisect_range(key, K, lo, hi):
    """The K-th largest of a block of keys held in registers, known to lie in [lo, hi]: as
    many rounds as the range has bits (the select's range runs from the guess to the row's
    largest candidate, a few hundred bf16 keys: 8-9 rounds where _bisect_block takes 16)."""
    lo = lo.to(tl.int64)
    hi = hi.to(tl.int64)
    while lo < hi:
        mid = lo + (hi - lo + 1) // 2
        take = tl.sum((key >= mid).to(tl.int32), axis=0) >= K
        lo = tl.where(take, mid, lo)
        hi = tl.where(take, hi, mid - 1)
    return lo


@triton.jit
def _sample_guess(base, N, T, KEY_BITS: tl.constexpr, SAMPLE: tl.constexpr, GROUP: tl.constexpr):
    """A key just below the T-th largest of the row's first SAMPLE columns (feature order is
    arbitrary, so they are a fair sample; T is chosen so about 4k entries of the row lie
    above it), taken as the T-th largest of the maxima of the sample's groups of GROUP
    columns: at least T entries reach it, so it is at or below the T-th entry, and with 8T
    groups or more few of the top T share a group, so it lies just below. Bisecting
    SAMPLE / GROUP maxima costs a GROUP-th of bisecting the sample."""
    g = tl.arange(0, SAMPLE // GROUP)
    s_cols = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    s_mask = s_cols < N
    s_key = _keys(tl.load(base + s_cols, mask=s_mask, other=0.0), s_mask, KEY_BITS)
    return _bisect_block(tl.max(s_key, axis=1), T, KEY_BITS) - 1  # "- 1": the T-th itself is above it


@triton.jit
def _emit_block(z, key, cols, valid, lo, K, val_ptr, idx_ptr, out_row):
    """Write a register block's entries above lo, then its first ties at lo, K in all."""
    lo = lo.to(tl.int32)
    above = key > lo
    tie = (key == lo) & valid
    n_above = tl.sum(above.to(tl.int32), axis=0)
    t_rank = tl.cumsum(tie.to(tl.int32), axis=0)
    keep = above | (tie & (t_rank <= K - n_above))
    pos = tl.where(above, tl.cumsum(above.to(tl.int32), axis=0) - 1, n_above + t_rank - 1)
    tl.store(val_ptr + out_row + pos, tl.maximum(z.to(tl.float32), 0.0), mask=keep)
    tl.store(idx_ptr + out_row + pos, cols.to(tl.int64), mask=keep)


@triton.jit
def _row_topk_kernel(
    z_ptr, val_ptr, idx_ptr, kth_ptr, N, stride_z, K,
    KEY_BITS: tl.constexpr, CHUNK: tl.constexpr,
):
    row = tl.program_id(0)
    base = z_ptr + row.to(tl.int64) * stride_z
    lo = _bisect_chunked(base, N, K, KEY_BITS, CHUNK)
    _emit_chunked(base, N, K, lo, val_ptr, idx_ptr, row.to(tl.int64) * K, KEY_BITS, CHUNK)
    tl.store(kth_ptr + row, _key_to_float(lo, KEY_BITS))


@triton.jit
def _row_guess_kernel(z_ptr, guess_ptr, N, stride_z, T, KEY_BITS: tl.constexpr, SAMPLE: tl.constexpr, GROUP: tl.constexpr):
    row = tl.program_id(0)
    tl.store(guess_ptr + row, _sample_guess(z_ptr + row.to(tl.int64) * stride_z, N, T, KEY_BITS, SAMPLE, GROUP).to(tl.int32))


@triton.jit
def _segment_filter_kernel(
    z_ptr, guess_ptr, cand_ptr, count_ptr, N, stride_z,
    KEY_BITS: tl.constexpr, SEG: tl.constexpr, CMAX: tl.constexpr, VEC: tl.constexpr,
):
    """One program per (row, segment of SEG columns): the segment's columns whose key is
    above the row's guess go to the row's candidate buffer. The segment is held as runs of
    VEC columns, one run per thread (one vector load); a run with hits takes its slots with
    one relaxed atomic add on the row's counter and places them by a prefix sum inside the
    thread: one atomic per run rather than per hit (Triton's default acq_rel atomics per hit
    cost more than the counting itself; bench/gpu_profile.py)."""
    row, seg = tl.program_id(0), tl.program_id(1)
    cols = seg * SEG + tl.arange(0, SEG // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    mask = cols < N
    key = _keys(tl.load(z_ptr + row.to(tl.int64) * stride_z + cols, mask=mask, other=0.0), mask, KEY_BITS)
    hit = (key > tl.load(guess_ptr + row)).to(tl.int32)
    n_hit = tl.sum(hit, axis=1)
    first = tl.atomic_add(count_ptr + row + tl.zeros([SEG // VEC], tl.int32), n_hit, mask=n_hit > 0, sem="relaxed")
    slot = first[:, None] + tl.cumsum(hit, axis=1) - 1
    tl.store(cand_ptr + row.to(tl.int64) * CMAX + slot, cols, mask=(hit > 0) & (slot < CMAX))


@triton.jit
def _select_candidates_kernel(
    z_ptr, cand_ptr, count_ptr, guess_ptr, val_ptr, idx_ptr, kth_ptr, N, stride_z, K,
    KEY_BITS: tl.constexpr, CMAX: tl.constexpr, CHUNK: tl.constexpr,
):
    """Per row: if between K and CMAX columns lay above the guess, every entry of the top K
    is a candidate: sort the candidates by column (the atomics left them in any order),
    bisect and emit in registers. Any other row runs the streamed bisection."""
    row = tl.program_id(0)
    base = z_ptr + row.to(tl.int64) * stride_z
    out_row = row.to(tl.int64) * K
    count = tl.load(count_ptr + row)
    if (count >= K) & (count <= CMAX):
        slots = tl.arange(0, CMAX)
        c_cols = tl.load(cand_ptr + row.to(tl.int64) * CMAX + slots, mask=slots < count, other=2147483647)
        c_cols = tl.sort(c_cols)
        valid = slots < count
        c_z = tl.load(base + c_cols, mask=valid, other=0.0)
        c_key = _keys(c_z, valid, KEY_BITS)
        # every candidate lies above the guess, and K of them at or above the K-th largest
        lo = _bisect_range(c_key, K, tl.load(guess_ptr + row) + 1, tl.max(c_key, axis=0))
        _emit_block(c_z, c_key, c_cols, valid, lo, K, val_ptr, idx_ptr, out_row)
    else:
        lo = _bisect_chunked(base, N, K, KEY_BITS, CHUNK)
        _emit_chunked(base, N, K, lo, val_ptr, idx_ptr, out_row, KEY_BITS, CHUNK)
    tl.store(kth_ptr + row, _key_to_float(lo, KEY_BITS))


def row_topk(
    z: torch.Tensor,
    k: int,
    method: str = "split",
    chunk: int = 1024,
    num_warps: int | None = None,
    segment: int = 1024,
    oversample: int = 4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ReLU values float32 [B, k], indices int64 [B, k], k-th largest z per row float32 [B])
    of z (bf16, fp16 or fp32, rows contiguous). Ties at the k-th value keep the lowest
    columns. method: "split" (default) or "stream" (module docstring); chunk: the streamed
    pass's width; segment: the split filter's columns per program; oversample: how many
    times k columns the guess leaves above it (the margin against a fallback row).
    "split" spreads a row over several programs; one program per row (or the whole row in
    registers) leaves most of the GPU idle at training batch sizes (BENCHMARKS.md)."""
    B, N = z.shape
    require(z.stride(1) == 1, "`z` must have contiguous rows")
    require(0 < k <= N, f"`k={k}` must be between 1 and the {N} columns of `z`")
    values = torch.empty(B, k, device=z.device, dtype=torch.float32)
    indices = torch.empty(B, k, device=z.device, dtype=torch.int64)
    kth = torch.empty(B, device=z.device, dtype=torch.float32)
    if B == 0:
        return values, indices, kth
    key_bits = 32 if z.dtype == torch.float32 else 16
    warps = num_warps or 4
    if method == "stream":
        _row_topk_kernel[(B,)](z, values, indices, kth, N, z.stride(0), k, KEY_BITS=key_bits, CHUNK=chunk, num_warps=warps)
        return values, indices, kth
    if method != "split":
        raise ValueError(f"unknown top-k method {method!r}: use split or stream")
    # the guess: the rank-th largest of the first `sample` columns, so that about
    # oversample * k columns of the row lie above it; the candidate buffer holds 3x that
    sample = min(triton.next_power_of_2(N), 4096)
    rank = max(1, min(sample, -(-oversample * k * min(sample, N) // N)))
    cmax = triton.next_power_of_2(3 * oversample * k)
    seg = min(triton.next_power_of_2(N), segment)
    candidates = torch.empty(B, cmax, device=z.device, dtype=torch.int32)
    guess = torch.empty(B, device=z.device, dtype=torch.int32)
    counts = torch.zeros(B, device=z.device, dtype=torch.int32)
    group = max(1, min(16, 2 ** int(math.log2(max(1, sample // (8 * rank))))))  # 8 * rank groups or more
    _row_guess_kernel[(B,)](z, guess, N, z.stride(0), rank, KEY_BITS=key_bits, SAMPLE=sample, GROUP=group, num_warps=warps)
    _segment_filter_kernel[(B, triton.cdiv(N, seg))](z, guess, candidates, counts, N, z.stride(0),
                                                     KEY_BITS=key_bits, SEG=seg, CMAX=cmax, VEC=min(8, seg), num_warps=warps)
    _select_candidates_kernel[(B,)](z, candidates, counts, guess, values, indices, kth, N, z.stride(0), k,
                                    KEY_BITS=key_bits, CMAX=cmax, CHUNK=chunk, num_warps=warps)
    return values, indices, kth
