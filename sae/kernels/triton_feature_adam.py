"""The encoder and decoder gradients of a TopK step, applied by Adam in the same kernel.

Both weight gradients are sums over a feature's kept pairs (b, j), i.e. per feature row:
  dW_dec[f] = sum values[b, j] * grad_out[b]         (grad of x_hat: sae.kernels.triton_decode_residual)
  dW_enc[f] = sum grad_val[b, j] * xc[b]             (xc = x - b_dec, as the encoder product saw it)
  db_enc[f] = sum grad_val[b, j]                     (feature_sums, before: b_dec's gradient needs it
                                                      with the encoder rows of before the update)
With AuxK (sae.fused_step) the dead features also have an auxiliary gradient, computed
there as dense products over the dead features only: a feature with a row in it adds that
row to its sums (a dead feature gets up to a whole batch of auxiliary pairs, too many for
one program to walk).
Two programs own feature f, one its decoder row and one its encoder row: each accumulates
its gradient row from the pairs sorted by feature, then runs what torch does in four
passes over the weights (sae.trainer's step): the decoder gradient loses its part along
the (unit) row, Adam updates both rows and b_enc[f], the decoder row goes back to unit
norm, and the bf16 copies of the encoder row and the decoder row that the next step's
encoder product and decode read are written. Every parameter and moment is read and written once;
no gradient tensor of the weights' size exists. lr and the step count are device scalars,
so the step can be captured in a CUDA graph.
A frequent feature owns up to a whole batch of pairs, and one program walks them one
dependent L2 gather after another while the rest of the grid has long finished. So
chunk_sums first sums every whole run of CHUNK sorted pairs that lies inside one feature,
in parallel, and a feature's program walks only the pairs before and after its runs (under
2 * CHUNK) and adds the runs' sums.
Adam as torch.optim.Adam (no weight decay, no amsgrad):
  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
  p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from sae.kernels.checks import require
from sae.kernels.triton_scatter import sort_pairs_by_feature


@triton.jit
def _adam(p, m, v, g, beta1, beta2, eps, step_size, inv_sqrt_bc2):
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    p = p - step_size * m / (tl.sqrt(v) * inv_sqrt_bc2 + eps)
    return p, m, v


@triton.jit
def _hash32(x):
    """A 32-bit integer hash (Wellons' lowbias32): uniform bits from a counter in 7 ALU
    operations, where tl.randint4x's Philox spends about 100 per element."""
    x = x.to(tl.uint32)
    x ^= x >> 16
    x *= tl.full([], 0x7FEB352D, tl.uint32)
    x ^= x >> 15
    x *= tl.full([], 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _store_moment(ptr, x, random, mask, STOCHASTIC_BF16: tl.constexpr):
    """Store a float32 moment; into bfloat16 with stochastic rounding (random: uniform
    uint32, of which the low 16 bits are used): the magnitude rounds up with probability
    equal to the part dropped, so the rounding is unbiased. Adam's second moment moves
    ~0.1% a step, under half a bf16 ulp: rounded to nearest it would stop moving."""
    if STOCHASTIC_BF16:
        bits = (x.to(tl.uint32, bitcast=True) + (random & 0xFFFF)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    tl.store(ptr, x, mask=mask)


@triton.jit
def _own_pairs(start, end, CHUNK: tl.constexpr):
    """Split feature [start, end) of the sorted pairs into the whole chunks of CHUNK pairs
    inside it, [c_lo, c_hi) (summed by chunk_sums), and the pairs its program walks:
    [start, head_end) and [tail_start, end). CHUNK 0: no chunks."""
    if CHUNK > 0:
        c_lo = (start + CHUNK - 1) // CHUNK
        c_hi = end // CHUNK
        whole = c_hi > c_lo
        head_end = tl.where(whole, c_lo * CHUNK, end)
        tail_start = tl.where(whole, c_hi * CHUNK, end)
        c_hi = tl.where(whole, c_hi, c_lo)
    else:
        head_end, tail_start, c_lo, c_hi = end, end, start * 0, start * 0
    return head_end, tail_start, c_lo, c_hi


@triton.jit
def _walk_pairs(lo, hi, row_ptr, coef_ptr, dense_ptr, D, offs_d, mask_d, acc, coef_sum, n_pos, BLOCK_P: tl.constexpr):
    """Add sorted pairs [lo, hi) to the sum of coef * dense rows (values * grad_out rows for
    the decoder, grad_val * xc rows for the encoder), of coef, and of positive coefs."""
    for p0 in range(lo, hi, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < hi
        row = tl.load(row_ptr + offs_p, mask=mask_p, other=0).to(tl.int64)
        coef = tl.load(coef_ptr + offs_p, mask=mask_p, other=0.0)
        dense = tl.load(dense_ptr + row[:, None] * D + offs_d[None, :], mask=mask_p[:, None] & mask_d[None, :], other=0.0)
        acc += tl.sum(dense.to(tl.float32) * coef[:, None], axis=0)
        coef_sum += coef
        n_pos += (coef > 0).to(tl.int32)
    return acc, coef_sum, n_pos


@triton.jit
def _chunk_sums_kernel(
    feat_ptr, row_ptr, val_ptr, gval_ptr, grad_out_ptr, xc_ptr,
    dec_ptr, enc_ptr, gsum_ptr, fired_ptr, D,
    CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (chunk, column block, part): part 0 sums the decoder's rows, 1 the encoder's."""
    c = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    lo = c * CHUNK
    if tl.load(feat_ptr + lo) == tl.load(feat_ptr + lo + CHUNK - 1):  # a whole chunk inside one feature
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        coef_sum = tl.zeros([BLOCK_P], dtype=tl.float32)
        n_pos = tl.zeros([BLOCK_P], dtype=tl.int32)
        if tl.program_id(2) == 0:
            acc, coef_sum, n_pos = _walk_pairs(lo, lo + CHUNK, row_ptr, val_ptr, grad_out_ptr, D, offs_d, mask_d,
                                               acc, coef_sum, n_pos, BLOCK_P)
            tl.store(dec_ptr + c * D + offs_d, acc, mask=mask_d)
            if tl.program_id(1) == 0:
                tl.store(fired_ptr + c, tl.sum(n_pos, axis=0))
        else:
            acc, coef_sum, n_pos = _walk_pairs(lo, lo + CHUNK, row_ptr, gval_ptr, xc_ptr, D, offs_d, mask_d,
                                               acc, coef_sum, n_pos, BLOCK_P)
            tl.store(enc_ptr + c * D + offs_d, acc, mask=mask_d)
            if tl.program_id(1) == 0:
                tl.store(gsum_ptr + c, tl.sum(coef_sum, axis=0))


@triton.jit
def _sum_range(lo, hi, coef_ptr, acc, BLOCK_P: tl.constexpr):
    for p0 in range(lo, hi, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        acc += tl.load(coef_ptr + offs_p, mask=offs_p < hi, other=0.0)
    return acc


@triton.jit
def _feature_sums_kernel(offsets_ptr, coef_ptr, chunk_ptr, out_ptr, CHUNK: tl.constexpr, BLOCK_P: tl.constexpr):
    f = tl.program_id(0)
    start = tl.load(offsets_ptr + f)
    end = tl.load(offsets_ptr + f + 1)
    head_end, tail_start, c_lo, c_hi = _own_pairs(start, end, CHUNK)
    acc = _sum_range(start, head_end, coef_ptr, tl.zeros([BLOCK_P], dtype=tl.float32), BLOCK_P)
    total = tl.sum(_sum_range(tail_start, end, coef_ptr, acc, BLOCK_P), axis=0)
    if CHUNK > 0:
        for c in range(c_lo, c_hi):
            total += tl.load(chunk_ptr + c)
    tl.store(out_ptr + f, total)


@triton.jit
def _feature_row_sum(f, row_ptr, coef_ptr, dense_ptr, chunk_ptr, chunk_fired_ptr, aux_row_ptr, aux_ptr,
                     start, end, D, offs_d, mask_d,
                     CHUNK: tl.constexpr, HAS_AUX: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """Feature f's gradient row (the sum of coef * dense rows over its pairs, its whole
    chunks' sums, its auxiliary row) and its positive coefs (the firing count, for values)."""
    head_end, tail_start, c_lo, c_hi = _own_pairs(start, end, CHUNK)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    coef_sum = tl.zeros([BLOCK_P], dtype=tl.float32)
    n_pos = tl.zeros([BLOCK_P], dtype=tl.int32)
    acc, coef_sum, n_pos = _walk_pairs(start, head_end, row_ptr, coef_ptr, dense_ptr, D, offs_d, mask_d, acc, coef_sum, n_pos, BLOCK_P)
    acc, coef_sum, n_pos = _walk_pairs(tail_start, end, row_ptr, coef_ptr, dense_ptr, D, offs_d, mask_d, acc, coef_sum, n_pos, BLOCK_P)
    n = tl.sum(n_pos, axis=0)
    if CHUNK > 0:
        for c in range(c_lo, c_hi):
            acc += tl.load(chunk_ptr + c * D + offs_d, mask=mask_d, other=0.0)
            n += tl.load(chunk_fired_ptr + c)
    if HAS_AUX:  # a dead feature's row of the auxiliary gradient (-1: none)
        r = tl.load(aux_row_ptr + f)
        mask_r = mask_d & (offs_d * 0 + r >= 0)
        acc += tl.load(aux_ptr + tl.maximum(r, 0).to(tl.int64) * D + offs_d, mask=mask_r, other=0.0).to(tl.float32)
    return acc, n


@triton.jit
def _feature_adam_kernel(
    offsets_ptr,
    row_ptr,
    val_ptr,
    gval_ptr,
    grad_out_ptr,
    xc_ptr,
    w_dec_ptr,
    m_dec_ptr,
    v_dec_ptr,
    w_dec_lp_ptr,
    w_enc_ptr,
    m_enc_ptr,
    v_enc_ptr,
    w_enc_lp_ptr,
    b_enc_ptr,
    m_b_ptr,
    v_b_ptr,
    db_enc_ptr,
    fired_ptr,
    lr_ptr,
    step_ptr,
    aux_row_ptr,
    aux_dec_ptr,
    aux_enc_ptr,
    chunk_dec_ptr,
    chunk_enc_ptr,
    chunk_fired_ptr,
    D,
    beta1,
    beta2,
    log2_beta1,
    log2_beta2,
    eps,
    CHUNK: tl.constexpr,
    HAS_AUX: tl.constexpr,
    WRITE_LP: tl.constexpr,
    WRITE_DEC_LP: tl.constexpr,
    MOMENTS_BF16: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (f, part): part 0 updates feature f's decoder row, part 1 its encoder row and
    b_enc[f]. One program holding both rows is limited by its registers to too few programs
    an SM to hide the gathers; each of two holds half as much (the results are the same
    bit for bit)."""
    f = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    start = tl.load(offsets_ptr + f)
    end = tl.load(offsets_ptr + f + 1)
    at = f * D + offs_d
    t = tl.load(step_ptr).to(tl.float32)
    step_size = tl.load(lr_ptr).to(tl.float32) / (1.0 - tl.exp2(t * log2_beta1))
    inv_sqrt_bc2 = 1.0 / tl.sqrt(1.0 - tl.exp2(t * log2_beta2))
    # a fresh draw per element, step and moment: deterministic, so resume is exact
    counter = 2 * at.to(tl.uint32) ^ _hash32(t.to(tl.uint32))
    if tl.program_id(1) == 0:
        # the row's weights and moments first: their reads overlap the pair walk's gathers
        w = tl.load(w_dec_ptr + at, mask=mask_d, other=0.0)
        m = tl.load(m_dec_ptr + at, mask=mask_d, other=0.0).to(tl.float32)
        v = tl.load(v_dec_ptr + at, mask=mask_d, other=0.0).to(tl.float32)
        acc, fired = _feature_row_sum(
            f,
            row_ptr,
            val_ptr,
            grad_out_ptr,
            chunk_dec_ptr,
            chunk_fired_ptr,
            aux_row_ptr,
            aux_dec_ptr,
            start,
            end,
            D,
            offs_d,
            mask_d,
            CHUNK,
            HAS_AUX,
            BLOCK_P,
            BLOCK_D,
        )
        # tangent gradient, Adam, back to the unit sphere
        g = acc - tl.sum(acc * w, axis=0) * w
        w, m, v = _adam(w, m, v, g, beta1, beta2, eps, step_size, inv_sqrt_bc2)
        w = w / tl.maximum(tl.sqrt(tl.sum(w * w, axis=0)), 1e-8)
        tl.store(w_dec_ptr + at, w, mask=mask_d)
        if WRITE_DEC_LP:
            tl.store(w_dec_lp_ptr + at, w.to(w_dec_lp_ptr.dtype.element_ty), mask=mask_d)
        random = _hash32(counter) if MOMENTS_BF16 else counter  # unread in float32
        _store_moment(m_dec_ptr + at, m, random, mask_d, MOMENTS_BF16)
        _store_moment(v_dec_ptr + at, v, random >> 16, mask_d, MOMENTS_BF16)
        tl.store(fired_ptr + f, fired.to(tl.float32))
    else:
        w = tl.load(w_enc_ptr + at, mask=mask_d, other=0.0)
        m = tl.load(m_enc_ptr + at, mask=mask_d, other=0.0).to(tl.float32)
        v = tl.load(v_enc_ptr + at, mask=mask_d, other=0.0).to(tl.float32)
        acc, _ = _feature_row_sum(
            f,
            row_ptr,
            gval_ptr,
            xc_ptr,
            chunk_enc_ptr,
            chunk_fired_ptr,
            aux_row_ptr,
            aux_enc_ptr,
            start,
            end,
            D,
            offs_d,
            mask_d,
            CHUNK,
            HAS_AUX,
            BLOCK_P,
            BLOCK_D,
        )
        w, m, v = _adam(w, m, v, acc, beta1, beta2, eps, step_size, inv_sqrt_bc2)
        tl.store(w_enc_ptr + at, w, mask=mask_d)
        if WRITE_LP:
            tl.store(w_enc_lp_ptr + at, w.to(w_enc_lp_ptr.dtype.element_ty), mask=mask_d)
        random = _hash32(counter + 1) if MOMENTS_BF16 else counter
        _store_moment(m_enc_ptr + at, m, random, mask_d, MOMENTS_BF16)
        _store_moment(v_enc_ptr + at, v, random >> 16, mask_d, MOMENTS_BF16)
        b, mb, vb = _adam(
            tl.load(b_enc_ptr + f), tl.load(m_b_ptr + f), tl.load(v_b_ptr + f), tl.load(db_enc_ptr + f), beta1, beta2, eps, step_size, inv_sqrt_bc2
        )
        tl.store(b_enc_ptr + f, b)
        tl.store(m_b_ptr + f, mb)
        tl.store(v_b_ptr + f, vb)


@triton.jit
def _sorted_pairs_kernel(order_ptr, idx_ptr, val_ptr, gval_ptr, rows_ptr, feat_ptr, row_ptr, sval_ptr, sgval_ptr, P, K,
                         HAS_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P
    pair = tl.load(order_ptr + offs, mask=mask, other=0)
    tl.store(feat_ptr + offs, tl.load(idx_ptr + pair, mask=mask, other=0).to(tl.int32), mask=mask)
    if HAS_ROWS:
        tl.store(row_ptr + offs, tl.load(rows_ptr + pair, mask=mask, other=0), mask=mask)
    else:
        tl.store(row_ptr + offs, (pair // K).to(tl.int32), mask=mask)
    tl.store(sval_ptr + offs, tl.load(val_ptr + pair, mask=mask, other=0.0), mask=mask)
    tl.store(sgval_ptr + offs, tl.load(gval_ptr + pair, mask=mask, other=0.0), mask=mask)


@triton.jit
def _vector_adam_kernel(p_ptr, m_ptr, v_ptr, g_ptr, g_minus_ptr, lr_ptr, step_ptr, N, beta1, beta2, log2_beta1, log2_beta2, eps, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    t = tl.load(step_ptr).to(tl.float32)
    step_size = tl.load(lr_ptr).to(tl.float32) / (1.0 - tl.exp2(t * log2_beta1))
    inv_sqrt_bc2 = 1.0 / tl.sqrt(1.0 - tl.exp2(t * log2_beta2))
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) - tl.load(g_minus_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p, m, v = _adam(
        tl.load(p_ptr + offs, mask=mask, other=0.0),
        tl.load(m_ptr + offs, mask=mask, other=0.0),
        tl.load(v_ptr + offs, mask=mask, other=0.0),
        g,
        beta1,
        beta2,
        eps,
        step_size,
        inv_sqrt_bc2,
    )
    tl.store(p_ptr + offs, p, mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)


class SortedPairs(NamedTuple):
    """The step's B*k kept (token row, feature) pairs in feature order, with their values and
    gradients, so the per-feature kernels read them contiguously instead of through the
    sort's permutation (one dependent load less before each gather)."""

    offsets: torch.Tensor  # [F + 1] int64: feature f's pairs are [offsets[f], offsets[f + 1])
    feature: torch.Tensor  # [P] int32
    row: torch.Tensor  # [P] int32: the token row b
    value: torch.Tensor  # [P] float32: values[b, j]
    grad_val: torch.Tensor  # [P] float32: grad_val[b, j]


def sort_pairs(indices: torch.Tensor, values: torch.Tensor, grad_val: torch.Tensor, n_features: int,
               rows: torch.Tensor | None = None) -> SortedPairs:
    """indices, values, grad_val [B, k] (values and grad_val float32) in feature order; or,
    with rows (int32, one per entry: sae.kernels.select.RowEntries), the flat [P] entries
    of a code whose rows differ in width."""
    order, offsets = sort_pairs_by_feature(indices, n_features)
    P = order.numel()
    out = [torch.empty(P, device=values.device, dtype=dtype) for dtype in (torch.int32, torch.int32, torch.float32, torch.float32)]
    if P:
        width = indices.shape[1] if rows is None else 1
        _sorted_pairs_kernel[(triton.cdiv(P, 1024),)](
            order, indices.reshape(-1), values.reshape(-1), grad_val.reshape(-1), rows if rows is not None else order, *out,
            P, width, HAS_ROWS=rows is not None, BLOCK=1024, num_warps=4
        )
    return SortedPairs(offsets, *out)


class PairChunks(NamedTuple):
    """chunk_sums' output: per whole chunk of `size` sorted pairs inside one feature (others
    are never written or read), the sums its feature's program adds instead of walking it."""

    size: int
    dec: torch.Tensor  # [C, D] float32: sum of values * grad_out rows
    enc: torch.Tensor  # [C, D] float32: sum of grad_val * xc rows
    grad_val: torch.Tensor  # [C] float32: sum of grad_val
    fired: torch.Tensor  # [C] int32: positive values


def chunk_sums(pairs: SortedPairs, grad_out: torch.Tensor, xc: torch.Tensor, size: int = 32, block_p: int = 16, block_d: int = 1024) -> PairChunks:
    """Sum the runs of `size` sorted pairs that lie inside one feature, one program per
    (run, block of block_d columns, decoder or encoder): what feature_sums and feature_adam then add for a
    frequent feature instead of walking its pairs one after another. Arguments as for
    feature_adam."""
    require(size > 0, f"`size` must be positive (got {size})")
    P, D = pairs.row.numel(), grad_out.shape[1]
    n = P // size
    out = PairChunks(
        size,
        torch.empty(n, D, device=xc.device),
        torch.empty(n, D, device=xc.device),
        torch.empty(n, device=xc.device),
        torch.empty(n, device=xc.device, dtype=torch.int32),
    )
    if n:
        block_d = min(triton.next_power_of_2(D), block_d)
        _chunk_sums_kernel[(n, triton.cdiv(D, block_d), 2)](
            pairs.feature,
            pairs.row,
            pairs.value,
            pairs.grad_val,
            grad_out,
            xc,
            out.dec,
            out.enc,
            out.grad_val,
            out.fired,
            D,
            CHUNK=size,
            BLOCK_P=min(block_p, triton.next_power_of_2(size)),
            BLOCK_D=block_d,
            num_warps=4,
        )
    return out


def feature_sums(pairs: SortedPairs, chunks: PairChunks | None = None, block_p: int = 16) -> torch.Tensor:
    """db_enc: out[f] = sum of grad_val over feature f's pairs; chunks: chunk_sums over them."""
    n_features = pairs.offsets.numel() - 1
    out = torch.empty(n_features, device=pairs.grad_val.device, dtype=torch.float32)
    if n_features:
        _feature_sums_kernel[(n_features,)](
            pairs.offsets,
            pairs.grad_val,
            chunks.grad_val if chunks is not None else out,
            out,
            CHUNK=chunks.size if chunks is not None else 0,
            BLOCK_P=block_p,
            num_warps=1,
        )
    return out


def feature_adam(
    pairs: SortedPairs,
    grad_out: torch.Tensor,
    xc: torch.Tensor,
    params: dict[str, torch.Tensor],
    moments: dict[str, tuple[torch.Tensor, torch.Tensor]],
    db_enc: torch.Tensor,
    lr: torch.Tensor,
    step: torch.Tensor,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    block_p: int = 4,
    num_warps: int | None = None,
    aux: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    chunks: PairChunks | None = None,
) -> torch.Tensor:
    """Update params["W_dec"] [F, D], params["W_enc_t"] [F, D] (feature-major encoder),
    params["b_enc"] [F] (float32, contiguous) and their Adam moments in place; write
    params["W_enc_lp"] (the low-precision encoder copy) if it is another tensor than W_enc_t,
    and params["W_dec_lp"] (the decoder's, for the next decode; optional) likewise.
    pairs (sort_pairs), grad_out and xc [B, D] (any float dtype) are the step's pairs and
    dense gradients; db_enc [F] from feature_sums; lr and step are one-element float32
    tensors (step already counts this update). The default warps (2 for rows up to 1024
    wide, 4 above) come from a sweep over BLOCK_P and warps at bench/gpu_train.py's three
    configs (bench/kernels_feature_adam.py). aux (AuxK): (row [F] int32, the feature's row
    in the next two or -1; dW_dec, dW_enc [n, D] contiguous, any float dtype), added to the
    sums of the features that have a row. chunks: chunk_sums over the same pairs (the same
    chunks feature_sums was given, if any). The weight matrices' moments may be float32 or
    bfloat16 (all four alike; stored with stochastic rounding). Returns the number of
    positive activations per feature [F] (the step's firing counts)."""
    W_dec, W_enc_t, b_enc, W_enc_lp = params["W_dec"], params["W_enc_t"], params["b_enc"], params["W_enc_lp"]
    W_dec_lp = params.get("W_dec_lp", W_dec)
    F, D = W_dec.shape
    require(grad_out.shape == xc.shape, f"`grad_out` {tuple(grad_out.shape)} and `xc` {tuple(xc.shape)} must have one shape")
    require(pairs.offsets.numel() == F + 1, f"`pairs` must be sorted over the {F} features of `params`")
    aux_row, aux_dec, aux_enc = aux if aux is not None else (b_enc, b_enc, b_enc)  # unread without aux
    chunk_dec, chunk_enc, chunk_fired = (chunks.dec, chunks.enc, chunks.fired) if chunks is not None else (b_enc,) * 3  # likewise
    require(len({t.dtype for t in (*moments["W_dec"], *moments["W_enc_t"])}) == 1, "`moments` of the weight matrices must share one dtype")
    for t in (W_dec, W_enc_t, b_enc, grad_out, xc, W_enc_lp, W_dec_lp, aux_dec, aux_enc, *moments["W_dec"], *moments["W_enc_t"], *moments["b_enc"]):
        require(t.is_contiguous(), "`params`, `moments`, `grad_out`, `xc` and `aux` must be contiguous")
    fired = torch.empty(F, device=W_dec.device, dtype=torch.float32)
    if F == 0:
        return fired
    block_d = triton.next_power_of_2(D)
    num_warps = num_warps or (2 if block_d <= 1024 else 4)
    beta1, beta2 = betas
    _feature_adam_kernel[(F, 2)](
        pairs.offsets,
        pairs.row,
        pairs.value,
        pairs.grad_val,
        grad_out,
        xc,
        W_dec,
        *moments["W_dec"],
        W_dec_lp,
        W_enc_t,
        *moments["W_enc_t"],
        W_enc_lp,
        b_enc,
        *moments["b_enc"],
        db_enc,
        fired,
        lr,
        step,
        aux_row,
        aux_dec,
        aux_enc,
        chunk_dec,
        chunk_enc,
        chunk_fired,
        D,
        beta1,
        beta2,
        math.log2(beta1),
        math.log2(beta2),
        eps,
        CHUNK=chunks.size if chunks is not None else 0,
        HAS_AUX=aux is not None,
        MOMENTS_BF16=moments["W_dec"][0].dtype == torch.bfloat16,
        WRITE_LP=W_enc_lp.data_ptr() != W_enc_t.data_ptr(),
        WRITE_DEC_LP=W_dec_lp.data_ptr() != W_dec.data_ptr(),
        BLOCK_P=block_p,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return fired


def vector_adam(
    param: torch.Tensor,
    moments: tuple[torch.Tensor, torch.Tensor],
    grad: torch.Tensor,
    grad_minus: torch.Tensor,
    lr: torch.Tensor,
    step: torch.Tensor,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> None:
    """Adam, as in feature_adam, on a float32 vector (b_dec) with the gradient
    grad - grad_minus (any float dtypes; the arithmetic is float32), in one launch (torch's
    ops take a dozen on a few thousand numbers)."""
    n = param.numel()
    require(
        all(t.is_contiguous() and t.numel() == n for t in (param, *moments, grad, grad_minus)),
        f"`moments`, `grad` and `grad_minus` must be contiguous with the {n} elements of `param`",
    )
    block = min(triton.next_power_of_2(max(n, 1)), 1024)
    beta1, beta2 = betas
    _vector_adam_kernel[(triton.cdiv(n, block),)](
        param, *moments, grad, grad_minus, lr, step, n, beta1, beta2, math.log2(beta1), math.log2(beta2), eps, BLOCK=block, num_warps=4
    )
