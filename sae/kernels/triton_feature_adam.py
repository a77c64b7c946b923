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
One program owns feature f: it accumulates both rows from the pairs sorted by feature, then
runs what torch does in four passes over the weights (sae.trainer's step): the decoder
gradient loses its part along the (unit) row, Adam updates both rows and b_enc[f], the
decoder row goes back to unit norm, and the bf16 copy of the encoder row that the next
encoder product reads is written. Every parameter and moment is read and written once;
no gradient tensor of the weights' size exists. lr and the step count are device scalars,
so the step can be captured in a CUDA graph.
Adam as torch.optim.Adam (no weight decay, no amsgrad):
  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
  p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _adam(p, m, v, g, beta1, beta2, eps, step_size, inv_sqrt_bc2):
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    p = p - step_size * m / (tl.sqrt(v) * inv_sqrt_bc2 + eps)
    return p, m, v


@triton.jit
def _store_moment(ptr, x, random, mask, STOCHASTIC_BF16: tl.constexpr):
    """Store a float32 moment; into bfloat16 with stochastic rounding (random: uniform
    uint32): the magnitude rounds up with probability equal to the part dropped, so the
    rounding is unbiased. Adam's second moment moves ~0.1% a step, under half a bf16 ulp:
    rounded to nearest it would stop moving."""
    if STOCHASTIC_BF16:
        bits = (x.to(tl.uint32, bitcast=True) + (random & 0xFFFF)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    tl.store(ptr, x, mask=mask)


@triton.jit
def _feature_sums_kernel(order_ptr, offsets_ptr, coef_ptr, out_ptr, BLOCK_P: tl.constexpr):
    f = tl.program_id(0)
    start = tl.load(offsets_ptr + f)
    end = tl.load(offsets_ptr + f + 1)
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < end
        pair = tl.load(order_ptr + offs_p, mask=mask_p, other=0)
        acc += tl.load(coef_ptr + pair, mask=mask_p, other=0.0)
    tl.store(out_ptr + f, tl.sum(acc, axis=0))


@triton.jit
def _feature_adam_kernel(
    order_ptr, offsets_ptr, val_ptr, gval_ptr, grad_out_ptr, xc_ptr,
    w_dec_ptr, m_dec_ptr, v_dec_ptr, w_enc_ptr, m_enc_ptr, v_enc_ptr, w_enc_lp_ptr,
    b_enc_ptr, m_b_ptr, v_b_ptr, db_enc_ptr, fired_ptr, lr_ptr, step_ptr,
    aux_row_ptr, aux_dec_ptr, aux_enc_ptr,
    K, D, beta1, beta2, log2_beta1, log2_beta2, eps,
    HAS_AUX: tl.constexpr, WRITE_LP: tl.constexpr, MOMENTS_BF16: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    f = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    start = tl.load(offsets_ptr + f)
    end = tl.load(offsets_ptr + f + 1)
    acc_dec = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_enc = tl.zeros([BLOCK_D], dtype=tl.float32)
    n_fired = tl.zeros([BLOCK_P], dtype=tl.int32)
    for p0 in range(start, end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < end
        pair = tl.load(order_ptr + offs_p, mask=mask_p, other=0)
        row = pair // K
        a = tl.load(val_ptr + pair, mask=mask_p, other=0.0)
        g = tl.load(gval_ptr + pair, mask=mask_p, other=0.0)
        mask = mask_p[:, None] & mask_d[None, :]
        go = tl.load(grad_out_ptr + row[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        xc = tl.load(xc_ptr + row[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        acc_dec += tl.sum(go * a[:, None], axis=0)
        acc_enc += tl.sum(xc * g[:, None], axis=0)
        n_fired += (a > 0).to(tl.int32)
    if HAS_AUX:  # a dead feature's row of the auxiliary gradient (-1: none)
        r = tl.load(aux_row_ptr + f)
        mask_r = mask_d & (offs_d * 0 + r >= 0)
        at_r = tl.maximum(r, 0).to(tl.int64) * D + offs_d
        acc_dec += tl.load(aux_dec_ptr + at_r, mask=mask_r, other=0.0).to(tl.float32)
        acc_enc += tl.load(aux_enc_ptr + at_r, mask=mask_r, other=0.0).to(tl.float32)
    t = tl.load(step_ptr).to(tl.float32)
    step_size = tl.load(lr_ptr).to(tl.float32) / (1.0 - tl.exp2(t * log2_beta1))
    inv_sqrt_bc2 = 1.0 / tl.sqrt(1.0 - tl.exp2(t * log2_beta2))
    at = f * D + offs_d
    w_dec = tl.load(w_dec_ptr + at, mask=mask_d, other=0.0)
    m_dec = tl.load(m_dec_ptr + at, mask=mask_d, other=0.0).to(tl.float32)
    v_dec = tl.load(v_dec_ptr + at, mask=mask_d, other=0.0).to(tl.float32)
    w_enc = tl.load(w_enc_ptr + at, mask=mask_d, other=0.0)
    m_enc = tl.load(m_enc_ptr + at, mask=mask_d, other=0.0).to(tl.float32)
    v_enc = tl.load(v_enc_ptr + at, mask=mask_d, other=0.0).to(tl.float32)
    if MOMENTS_BF16:  # a fresh draw per element, step and moment: deterministic, so resume is exact
        r0, r1, r2, r3 = tl.randint4x(t.to(tl.int32), at.to(tl.int32))
    else:
        r0, r1, r2, r3 = offs_d, offs_d, offs_d, offs_d  # unread
    # decoder row: tangent gradient, Adam, back to the unit sphere
    g_dec = acc_dec - tl.sum(acc_dec * w_dec, axis=0) * w_dec
    w, m, v = _adam(w_dec, m_dec, v_dec, g_dec, beta1, beta2, eps, step_size, inv_sqrt_bc2)
    w = w / tl.maximum(tl.sqrt(tl.sum(w * w, axis=0)), 1e-8)
    tl.store(w_dec_ptr + at, w, mask=mask_d)
    _store_moment(m_dec_ptr + at, m, r0, mask_d, MOMENTS_BF16)
    _store_moment(v_dec_ptr + at, v, r1, mask_d, MOMENTS_BF16)
    # encoder row (feature-major), and its low-precision copy
    w, m, v = _adam(w_enc, m_enc, v_enc, acc_enc, beta1, beta2, eps, step_size, inv_sqrt_bc2)
    tl.store(w_enc_ptr + at, w, mask=mask_d)
    _store_moment(m_enc_ptr + at, m, r2, mask_d, MOMENTS_BF16)
    _store_moment(v_enc_ptr + at, v, r3, mask_d, MOMENTS_BF16)
    if WRITE_LP:
        tl.store(w_enc_lp_ptr + at, w.to(w_enc_lp_ptr.dtype.element_ty), mask=mask_d)
    b, mb, vb = _adam(tl.load(b_enc_ptr + f), tl.load(m_b_ptr + f), tl.load(v_b_ptr + f), tl.load(db_enc_ptr + f),
                      beta1, beta2, eps, step_size, inv_sqrt_bc2)
    tl.store(b_enc_ptr + f, b)
    tl.store(m_b_ptr + f, mb)
    tl.store(v_b_ptr + f, vb)
    tl.store(fired_ptr + f, tl.sum(n_fired, axis=0).to(tl.float32))


def feature_sums(order: torch.Tensor, offsets: torch.Tensor, coef: torch.Tensor, block_p: int = 16) -> torch.Tensor:
    """out[f] = sum of coef over feature f's pairs (order/offsets from sort_pairs_by_feature)."""
    n_features = offsets.numel() - 1
    out = torch.empty(n_features, device=coef.device, dtype=torch.float32)
    if n_features:
        _feature_sums_kernel[(n_features,)](order, offsets, coef.reshape(-1), out, BLOCK_P=block_p, num_warps=1)
    return out


def feature_adam(
    order: torch.Tensor,
    offsets: torch.Tensor,
    values: torch.Tensor,
    grad_val: torch.Tensor,
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
) -> torch.Tensor:
    """Update params["W_dec"] [F, D], params["W_enc_t"] [F, D] (feature-major encoder),
    params["b_enc"] [F] (float32, contiguous) and their Adam moments in place; write
    params["W_enc_lp"] (the low-precision encoder copy) if it is another tensor than W_enc_t.
    values / grad_val [B, k] float32, grad_out and xc [B, D] (any float dtype) are the
    step's pairs and dense gradients; db_enc [F] from feature_sums; lr and step are
    one-element float32 tensors (step already counts this update). The default blocks
    won bench/kernels_feature_adam.py's sweep on an H100 (0.54 ms at 768 x 24576, B4096,
    against 1.09 ms for the unfused torch sequence). aux (AuxK): (row [F] int32, the
    feature's row in the next two or -1; dW_dec, dW_enc [n, D] contiguous, any float dtype),
    added to the sums of the features that have a row. The weight matrices' moments may be
    float32 or bfloat16 (all four alike; stored with stochastic rounding). Returns the number of positive
    activations per feature [F] (the step's firing counts)."""
    W_dec, W_enc_t, b_enc, W_enc_lp = params["W_dec"], params["W_enc_t"], params["b_enc"], params["W_enc_lp"]
    F, D = W_dec.shape
    B, K = values.shape
    assert grad_out.shape[0] == B
    aux_row, aux_dec, aux_enc = aux if aux is not None else (b_enc, b_enc, b_enc)  # unread without aux
    assert len({t.dtype for t in (*moments["W_dec"], *moments["W_enc_t"])}) == 1, "the weights' moments share one dtype"
    for t in (W_dec, W_enc_t, b_enc, grad_out, xc, W_enc_lp, aux_dec, aux_enc,
              *moments["W_dec"], *moments["W_enc_t"], *moments["b_enc"]):
        assert t.is_contiguous(), "feature_adam needs contiguous tensors"
    fired = torch.empty(F, device=W_dec.device, dtype=torch.float32)
    if F == 0:
        return fired
    block_d = triton.next_power_of_2(D)
    num_warps = num_warps or (4 if block_d <= 2048 else 8)
    beta1, beta2 = betas
    _feature_adam_kernel[(F,)](
        order, offsets, values.reshape(-1), grad_val.reshape(-1), grad_out, xc,
        W_dec, *moments["W_dec"], W_enc_t, *moments["W_enc_t"], W_enc_lp,
        b_enc, *moments["b_enc"], db_enc, fired, lr, step, aux_row, aux_dec, aux_enc,
        K, D, beta1, beta2, math.log2(beta1), math.log2(beta2), eps,
        HAS_AUX=aux is not None, MOMENTS_BF16=moments["W_dec"][0].dtype == torch.bfloat16, WRITE_LP=W_enc_lp.data_ptr() != W_enc_t.data_ptr(), BLOCK_P=block_p, BLOCK_D=block_d, num_warps=num_warps,
    )
    return fired
