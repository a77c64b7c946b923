"""Adam on tied weights (GBA's), one program per feature, from the step's sorted pairs.

With tied weights (sae.model.SparseAutoencoder.tied) there is one matrix W [F, D]: the
decoder rows are W's rows and the encoder rows their unit directions u_f = w_f / |w_f|. A
feature's gradient row has both parts of an untied step (sae.kernels.triton_feature_adam):
  g_dec[f] = sum values[b, j] * grad_out[b]            (through x_hat)
  g_u[f]   = sum grad_val[b, j] * xc[b]                (through z = xc . u_f)
and the encoder part reaches w_f through the normalisation, d u / d w = (I - u u^T) / |w|:
  g[f] = g_dec[f] + (g_u[f] - (u_f . g_u[f]) u_f) / |w_f|
which is what autograd computes through torch.nn.functional.normalize (eps 1e-12). Adam as
torch.optim.Adam updates every row (a feature with no pairs has g = 0 and still moves by
its moments); the row keeps its norm (the feature's output scale: no renormalisation), and
the program writes the low-precision copies the next step reads: the decoder row, and the
encoder row u_f = w_f / |w_f| of the updated row. No encoder bias: GBA's thresholds are
buffers set by their own rule, not trained.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sae.kernels.checks import require
from sae.kernels.triton_feature_adam import PairChunks, SortedPairs, _adam, _feature_row_sum, _hash32, _store_moment


@triton.jit
def _tied_adam_kernel(
    offsets_ptr, row_ptr, val_ptr, gval_ptr, grad_out_ptr, xc_ptr,
    w_ptr, m_ptr, v_ptr, w_dec_lp_ptr, w_enc_lp_ptr, fired_ptr, lr_ptr, step_ptr,
    chunk_dec_ptr, chunk_enc_ptr, chunk_fired_ptr,
    D, beta1, beta2, log2_beta1, log2_beta2, eps,
    CHUNK: tl.constexpr, WRITE_DEC_LP: tl.constexpr, MOMENTS_BF16: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program f: feature f's gradient row from its pairs (both parts), Adam on its row,
    and the row's decoder and encoder copies."""
    f = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    start = tl.load(offsets_ptr + f)
    end = tl.load(offsets_ptr + f + 1)
    at = f * D + offs_d
    t = tl.load(step_ptr).to(tl.float32)
    step_size = tl.load(lr_ptr).to(tl.float32) / (1.0 - tl.exp2(t * log2_beta1))
    inv_sqrt_bc2 = 1.0 / tl.sqrt(1.0 - tl.exp2(t * log2_beta2))
    counter = 2 * at.to(tl.uint32) ^ _hash32(t.to(tl.uint32))
    w = tl.load(w_ptr + at, mask=mask_d, other=0.0)
    m = tl.load(m_ptr + at, mask=mask_d, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + at, mask=mask_d, other=0.0).to(tl.float32)
    g_dec, fired = _feature_row_sum(f, row_ptr, val_ptr, grad_out_ptr, chunk_dec_ptr, chunk_fired_ptr, chunk_fired_ptr,
                                    chunk_fired_ptr, start, end, D, offs_d, mask_d, CHUNK, False, BLOCK_P, BLOCK_D)
    g_u, _ = _feature_row_sum(f, row_ptr, gval_ptr, xc_ptr, chunk_enc_ptr, chunk_fired_ptr, chunk_fired_ptr,
                              chunk_fired_ptr, start, end, D, offs_d, mask_d, CHUNK, False, BLOCK_P, BLOCK_D)
    norm = tl.maximum(tl.sqrt(tl.sum(w * w, axis=0)), 1e-12)
    u = w / norm
    g = g_dec + (g_u - tl.sum(g_u * u, axis=0) * u) / norm
    w, m, v = _adam(w, m, v, g, beta1, beta2, eps, step_size, inv_sqrt_bc2)
    tl.store(w_ptr + at, w, mask=mask_d)
    if WRITE_DEC_LP:
        tl.store(w_dec_lp_ptr + at, w.to(w_dec_lp_ptr.dtype.element_ty), mask=mask_d)
    u = w / tl.maximum(tl.sqrt(tl.sum(w * w, axis=0)), 1e-12)
    tl.store(w_enc_lp_ptr + at, u.to(w_enc_lp_ptr.dtype.element_ty), mask=mask_d)
    random = _hash32(counter) if MOMENTS_BF16 else counter  # unread in float32
    _store_moment(m_ptr + at, m, random, mask_d, MOMENTS_BF16)
    _store_moment(v_ptr + at, v, random >> 16, mask_d, MOMENTS_BF16)
    tl.store(fired_ptr + f, fired.to(tl.float32))


def tied_feature_adam(
    pairs: SortedPairs,
    grad_out: torch.Tensor,
    xc: torch.Tensor,
    params: dict[str, torch.Tensor],
    moments: tuple[torch.Tensor, torch.Tensor],
    lr: torch.Tensor,
    step: torch.Tensor,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    block_p: int = 4,
    num_warps: int | None = None,
    chunks: PairChunks | None = None,
) -> torch.Tensor:
    """Update params["W_dec"] [F, D] (float32, the tied matrix) and its Adam moments (float32
    or bfloat16, stochastic rounding) in place, and write params["W_enc_lp"] [F, D] (the unit
    rows, the next encoder product's feature-major operand) and params["W_dec_lp"] (the
    decoder copy; skipped where it is W_dec itself). pairs, grad_out, xc, lr, step and chunks
    as sae.kernels.triton_feature_adam.feature_adam takes them. Returns the number of
    positive activations per feature [F]."""
    W, W_enc_lp = params["W_dec"], params["W_enc_lp"]
    W_dec_lp = params.get("W_dec_lp", W)
    F, D = W.shape
    require(grad_out.shape == xc.shape, f"`grad_out` {tuple(grad_out.shape)} and `xc` {tuple(xc.shape)} must have one shape")
    require(pairs.offsets.numel() == F + 1, f"`pairs` must be sorted over the {F} features of `params`")
    require(W_enc_lp.shape == W.shape and W_enc_lp.data_ptr() != W.data_ptr(), "`W_enc_lp` must be a tensor of its own, shaped as `W_dec`")
    for t in (W, W_enc_lp, W_dec_lp, grad_out, xc, *moments):
        require(t.is_contiguous(), "`params`, `moments`, `grad_out` and `xc` must be contiguous")
    fired = torch.empty(F, device=W.device, dtype=torch.float32)
    if F == 0:
        return fired
    chunk_dec, chunk_enc, chunk_fired = (chunks.dec, chunks.enc, chunks.fired) if chunks is not None else (fired,) * 3  # unread without
    block_d = triton.next_power_of_2(D)
    beta1, beta2 = betas
    _tied_adam_kernel[(F,)](
        pairs.offsets, pairs.row, pairs.value, pairs.grad_val, grad_out, xc,
        W, *moments, W_dec_lp, W_enc_lp, fired, lr, step,
        chunk_dec, chunk_enc, chunk_fired,
        D, beta1, beta2, math.log2(beta1), math.log2(beta2), eps,
        CHUNK=chunks.size if chunks is not None else 0,
        WRITE_DEC_LP=W_dec_lp.data_ptr() != W.data_ptr(),
        MOMENTS_BF16=moments[0].dtype == torch.bfloat16,
        BLOCK_P=block_p, BLOCK_D=block_d, num_warps=num_warps or (2 if block_d <= 1024 else 4),
    )
    return fired
