"""x - b_dec in the encoder product's dtype, and the batch's variance, from one read of x.

The FVU's denominator sum_b ||x_b - mean||^2 equals sum_b ||c_b||^2 - ||sum_b c_b||^2 / B
for any shift c_b = x_b - s. With s = b_dec, which sits near the data's mean (it is
initialised there and trained as the reconstruction's offset), both terms stay close to the
result, so float32 holds it even where activations have a large mean. The encoder product
reads the same c, so one pass over x writes c and each block of rows' column sums and
squares; programs of 32 columns then add the blocks, and the last of them to finish adds
their parts, each sum in a fixed order (deterministic), and writes the variance and its
reciprocal, the loss's scale (one program adding every block serialises the sum). torch
takes five passes and as many launches for the variance and the shifted copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sae.kernels.checks import require


@triton.jit
def _centre_kernel(x_ptr, b_ptr, xc_ptr, colsum_ptr, sq_ptr, B, D, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    rb = tl.program_id(0)
    rows = rb * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = rows < B
    sq = tl.zeros([BLOCK_B], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask_d = cols < D
        mask = mask_b[:, None] & mask_d[None, :]
        at = rows[:, None].to(tl.int64) * D + cols[None, :]
        c = tl.load(x_ptr + at, mask=mask, other=0.0) - tl.load(b_ptr + cols, mask=mask_d, other=0.0)[None, :]
        c = tl.where(mask, c, 0.0)
        tl.store(xc_ptr + at, c.to(xc_ptr.dtype.element_ty), mask=mask)
        tl.store(colsum_ptr + rb * D + cols, tl.sum(c, axis=0), mask=mask_d)
        sq += tl.sum(c * c, axis=1)
    tl.store(sq_ptr + rb, tl.sum(sq, axis=0))


@triton.jit
def _variance_kernel(colsum_ptr, sq_ptr, part_ptr, done_ptr, out_ptr, n_blocks, B, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per BLOCK_D columns: its part of ||sum_b c_b||^2. The program that
    finishes last (a counter) adds the parts and the blocks' squares, in a fixed order."""
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col = tl.zeros([BLOCK_D], dtype=tl.float32)
    for r0 in range(0, n_blocks, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        mask = (r < n_blocks)[:, None] & (cols < D)[None, :]
        col += tl.sum(tl.load(colsum_ptr + r[:, None] * D + cols[None, :], mask=mask, other=0.0), axis=0)
    tl.store(part_ptr + tl.program_id(0), tl.sum(col * col, axis=0))
    n_parts = tl.num_programs(0)
    if tl.atomic_add(done_ptr, 1, sem="acq_rel") == n_parts - 1:
        sq = tl.zeros([BLOCK_R], dtype=tl.float32)
        for r0 in range(0, n_blocks, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            sq += tl.load(sq_ptr + r, mask=r < n_blocks, other=0.0)
        mean_sq = tl.zeros([BLOCK_R], dtype=tl.float32)
        for p0 in range(0, n_parts, BLOCK_R):
            p = p0 + tl.arange(0, BLOCK_R)
            mean_sq += tl.load(part_ptr + p, mask=p < n_parts, other=0.0, cache_modifier=".cg")
        variance = tl.maximum(tl.sum(sq, axis=0) - tl.sum(mean_sq, axis=0) / B, 1e-12)
        tl.store(out_ptr, variance)
        tl.store(out_ptr + 1, 1.0 / variance)


def centre(x: torch.Tensor, b_dec: torch.Tensor, dtype: torch.dtype, block_b: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x - b_dec in dtype, the batch variance sum_b ||x_b - mean||^2 clamped above 0, and
    1 / variance), the last two as one-element float32 tensors, for x [B, D] float32
    contiguous and b_dec [D] float32."""
    B, D = x.shape
    require(x.is_contiguous() and x.dtype == torch.float32, f"`x` must be contiguous float32 (got {x.dtype})")
    require(b_dec.dtype == torch.float32 and b_dec.shape == (D,), f"`b_dec` must be float32 of shape ({D},) (got {b_dec.dtype} {tuple(b_dec.shape)})")
    xc = torch.empty(B, D, device=x.device, dtype=dtype)
    n_blocks = triton.cdiv(B, block_b)
    colsum = torch.empty(n_blocks, D, device=x.device)
    sq = torch.empty(n_blocks, device=x.device)
    out = torch.empty(2, device=x.device)
    block_d = min(triton.next_power_of_2(max(D, 1)), 256)
    if B:
        _centre_kernel[(n_blocks,)](x, b_dec, xc, colsum, sq, B, D, BLOCK_B=block_b, BLOCK_D=block_d, num_warps=4)
    part_d = min(block_d, 32)
    n_parts = triton.cdiv(max(D, 1), part_d)
    parts, done = torch.empty(n_parts, device=x.device), torch.zeros(1, device=x.device, dtype=torch.int32)
    _variance_kernel[(n_parts,)](colsum, sq, parts, done, out, n_blocks, max(B, 1), D, BLOCK_R=32, BLOCK_D=part_d, num_warps=1)
    return xc, out[:1], out[1:]
