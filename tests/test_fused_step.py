"""The fused TopK step's kernels against float64 references (Triton under TRITON_INTERPRET=1),
and the whole step against the trainer's sequence of torch ops in float64."""

import copy
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from sae.errors import SAEError
from sae.fused_step import FusedTopKStep
from sae.kernels import RowEntries
from sae.kernels.triton_centre import centre
from sae.kernels.triton_decode_residual import decode_residual, decode_residual_entries
from sae.kernels.triton_feature_adam import chunk_sums, feature_adam, feature_sums, sort_pairs
from sae.kernels.triton_tied_adam import tied_feature_adam
from sae.losses import aux_candidates, aux_reconstruction_loss
from sae.model import SparseAutoencoder
from sae.rules import TopKRule
from sae.rules.jumprelu import JumpReLURule


@pytest.fixture
def poisoned():
    """torch.empty returns NaN (floats) or the largest integer: unwritten outputs show."""
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(False)


def pairs(B, F, k, gen):
    """Indices with a repeated index in row 0, values with an all-zero row 1 and ReLU zeros."""
    indices = torch.randint(0, F, (B, k), generator=gen)
    indices[0] = indices[0, 0]
    values = torch.randn(B, k, generator=gen).relu()
    values[min(1, B - 1)] = 0.0
    return indices, values


@pytest.mark.parametrize("B,F,D,k", [(5, 11, 37, 1), (4, 40, 300, 7), (3, 9, 20, 9), (6, 50, 130, 33)])
def test_decode_residual_matches_autograd_in_float64(B, F, D, k, poisoned):
    gen = torch.Generator().manual_seed(B * D + k)
    W, b_dec, x = torch.randn(F, D, generator=gen), torch.randn(D, generator=gen), torch.randn(B, D, generator=gen)
    indices, values = pairs(B, F, k, gen)
    scale = torch.tensor([0.37])
    grad_out, grad_val, sq_err = decode_residual(indices, values, W, b_dec, x, scale)

    v64 = values.double().requires_grad_()
    x_hat = (v64[:, :, None] * W.double()[indices]).sum(1) + b_dec.double()
    x_hat.retain_grad()
    sq = (x_hat - x.double()).pow(2).sum(1)
    (0.37 * sq.sum()).backward()
    torch.testing.assert_close(grad_out.double(), x_hat.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_val.double(), torch.where(values > 0, v64.grad, 0.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sq_err.double(), sq.detach(), rtol=1e-5, atol=1e-5)
    # a bf16 grad_out is the float32 one rounded; grad_val and sq_err do not change
    grad_bf16, grad_val_2, sq_err_2 = decode_residual(indices, values, W, b_dec, x, scale, torch.bfloat16)
    assert grad_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(grad_bf16.float(), grad_out, rtol=2**-7, atol=1e-6)
    assert torch.equal(grad_val_2, grad_val) and torch.equal(sq_err_2, sq_err)
    # with the residual x - x_hat (AuxK's target)
    residual = torch.empty(B, D)
    assert torch.equal(decode_residual(indices, values, W, b_dec, x, scale, residual=residual)[0], grad_out)
    torch.testing.assert_close(residual.double(), x.double() - x_hat.detach(), rtol=1e-5, atol=1e-5)
    # bf16 decoder rows: exact float32 sums of the rounded rows
    W_lp = W.to(torch.bfloat16)
    x_hat_lp = (values.double()[:, :, None] * W_lp.double()[indices]).sum(1) + b_dec.double()
    grad_lp, grad_val_lp, sq_err_lp = decode_residual(indices, values, W_lp, b_dec, x, scale)
    torch.testing.assert_close(grad_lp.double(), 2 * 0.37 * (x_hat_lp - x.double()), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_val_lp.double(), torch.where(values > 0, (grad_lp.double()[:, None, :] * W_lp.double()[indices]).sum(2), 0.0),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sq_err_lp.double(), (x_hat_lp - x.double()).pow(2).sum(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("D", [37, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_residual_entries_match_autograd_on_rows_of_any_width(D, dtype, poisoned):
    gen = torch.Generator().manual_seed(D)
    B, F = 5, 40
    widths = torch.tensor([3, 0, 17, 1, 9])  # an empty row, and rows wider than a block of entries
    rows = torch.arange(B).repeat_interleave(widths)
    indices = torch.randint(0, F, (len(rows),), generator=gen)
    values = torch.randn(len(rows), generator=gen).relu()  # ReLU zeros: padding entries
    code = RowEntries(values, indices, rows.to(torch.int32), torch.cat([torch.zeros(1, dtype=torch.long), widths.cumsum(0)]))
    W, b_dec, x = torch.randn(F, D, generator=gen), torch.randn(D, generator=gen), torch.randn(B, D, generator=gen)
    scale, residual = torch.tensor([0.37]), torch.empty(B, D)
    grad_out, grad_val, sq_err = decode_residual_entries(code, W.to(dtype), b_dec, x, scale, residual=residual)

    W64 = W.to(dtype).double()
    v64 = values.double().requires_grad_()
    x_hat = torch.zeros(B, D, dtype=torch.float64).index_add(0, rows, v64[:, None] * W64[indices]) + b_dec.double()
    x_hat.retain_grad()
    sq = (x_hat - x.double()).pow(2).sum(1)
    (0.37 * sq.sum()).backward()
    torch.testing.assert_close(grad_out.double(), x_hat.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_val.double(), torch.where(values > 0, v64.grad, 0.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sq_err.double(), sq.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(residual.double(), x.double() - x_hat.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B,D,mean,shift_off", [(37, 70, 0.0, 1.0), (5, 300, 1000.0, 0.01), (70, 33, 5.0, 5.0), (1, 8, 0.0, 0.0)])
def test_centre_gives_the_shifted_input_and_the_batch_variance(B, D, mean, shift_off, poisoned):
    """xc = x - b_dec (in the encoder's dtype) and sum ||x - mean||^2 against float64, also
    where activations sit far from 0 (b_dec near their mean, as training keeps it)."""
    gen = torch.Generator().manual_seed(B + D)
    x = torch.randn(B, D, generator=gen) + mean
    b_dec = x.mean(0) + shift_off * torch.randn(D, generator=gen)
    xc, variance, scale = centre(x, b_dec, torch.float32)
    ref = (x.double() - x.double().mean(0)).pow(2).sum().clamp(min=1e-12)
    torch.testing.assert_close(xc, x - b_dec)
    torch.testing.assert_close(variance.double(), ref.reshape(1), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(scale.double(), 1 / ref.reshape(1), rtol=1e-5, atol=0)
    xc_bf16 = centre(x, b_dec, torch.bfloat16)[0]
    assert xc_bf16.dtype == torch.bfloat16 and ((xc_bf16.float() - xc).abs() <= xc.abs() * 2**-7).all()


def reference_adam_step(params64, grads64, opt):
    """The trainer's order of torch ops in float64: tangent decoder gradient, Adam, unit rows."""
    W_dec = params64["W_dec"]
    for name, g in grads64.items():
        params64[name].grad = g.clone()
    W_dec.grad -= (W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec
    opt.step()
    with torch.no_grad():
        W_dec /= W_dec.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("chunk", [0, 4], ids=["pairs-walked", "whole-chunks-summed-first"])
@pytest.mark.parametrize("B,F,D,k,xc_dtype", [(6, 13, 37, 3, torch.float32), (4, 30, 260, 8, torch.bfloat16),
                                              (3, 5, 20, 5, torch.float32), (24, 5, 70, 4, torch.float32)])
def test_feature_adam_matches_torch_adam_over_two_steps(B, F, D, k, xc_dtype, chunk, poisoned):
    """chunk: chunk_sums first sums each whole run of `chunk` pairs inside a feature (the last
    shape gives every feature ~19 pairs: runs with pairs before and after them)."""
    gen = torch.Generator().manual_seed(F * D)
    W_dec = torch.randn(F, D, generator=gen)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    params = {"W_dec": W_dec, "W_enc_t": torch.randn(F, D, generator=gen), "b_enc": torch.randn(F, generator=gen)}
    params["W_enc_lp"], params["W_dec_lp"] = params["W_enc_t"].to(torch.bfloat16), params["W_dec"].to(torch.bfloat16)
    moments = {n: (torch.zeros_like(t), torch.zeros_like(t)) for n, t in params.items() if not n.endswith("_lp")}
    params64 = {n: params[n].double().clone().requires_grad_() for n in ("W_dec", "W_enc_t", "b_enc")}
    opt = torch.optim.Adam(list(params64.values()), lr=3e-2, foreach=False)
    lr, step = torch.tensor([3e-2]), torch.zeros(1)
    for _ in range(2):
        indices, values = pairs(B, F, k, gen)
        grad_val = torch.where(values > 0, torch.randn(B, k, generator=gen), 0.0)
        grad_out, xc = torch.randn(B, D, generator=gen), torch.randn(B, D, generator=gen).to(xc_dtype)
        by_feature = sort_pairs(indices, values, grad_val, F)
        chunks = chunk_sums(by_feature, grad_out, xc, chunk, block_p=2, block_d=32) if chunk else None
        db_enc = feature_sums(by_feature, chunks)
        step += 1
        fired = feature_adam(by_feature, grad_out, xc, params, moments, db_enc, lr, step, chunks=chunks)

        flat = indices.reshape(-1)
        rows = torch.arange(B).repeat_interleave(k)
        zeros = torch.zeros(F, D, dtype=torch.float64)
        grads64 = {
            "W_dec": zeros.index_add(0, flat, values.double().reshape(-1, 1) * grad_out.double()[rows]),
            "W_enc_t": zeros.index_add(0, flat, grad_val.double().reshape(-1, 1) * xc.double()[rows]),
            "b_enc": torch.zeros(F, dtype=torch.float64).index_add(0, flat, grad_val.double().reshape(-1)),
        }
        torch.testing.assert_close(db_enc.double(), grads64["b_enc"], rtol=1e-6, atol=1e-6)
        reference_adam_step(params64, grads64, opt)
        for name, ref in params64.items():
            torch.testing.assert_close(params[name].double(), ref.detach(), rtol=1e-5, atol=1e-6, msg=name)
        # within one bf16 step: the GPU rounds to nearest even, TRITON_INTERPRET (triton 3.x)
        # truncates; bench/gpu_fused_step.py checks equality with torch's cast on the GPU
        for lp, master in (("W_enc_lp", "W_enc_t"), ("W_dec_lp", "W_dec")):
            lp_error = (params[lp].float() - params[master]).abs()
            assert (lp_error <= params[master].abs() * 2**-7).all(), lp
        assert torch.equal(fired, torch.zeros(F).index_add(0, flat, (values > 0).float().reshape(-1)))


@pytest.mark.parametrize("chunk", [0, 4], ids=["pairs-walked", "whole-chunks-summed-first"])
@pytest.mark.parametrize("B,F,D,k", [(6, 13, 37, 3), (24, 5, 70, 4)])
def test_tied_feature_adam_matches_autograd_through_the_normalisation(B, F, D, k, chunk, poisoned):
    """GBA's one matrix W: the decoder part of the gradient through W's rows, the encoder part
    through their unit directions (torch.nn.functional.normalize), torch's Adam, no
    renormalisation; the encoder copy holds the updated unit rows."""
    gen = torch.Generator().manual_seed(F * D + k)
    W = torch.randn(F, D, generator=gen) * (0.5 + torch.rand(F, 1, generator=gen))  # rows of several norms
    params = {"W_dec": W, "W_enc_lp": torch.empty(F, D)}
    moments = (torch.zeros_like(W), torch.zeros_like(W))
    W64 = W.double().clone().requires_grad_()
    opt = torch.optim.Adam([W64], lr=3e-2, foreach=False)
    lr, step = torch.tensor([3e-2]), torch.zeros(1)
    for _ in range(2):
        indices, values = pairs(B, F, k, gen)
        grad_val = torch.where(values > 0, torch.randn(B, k, generator=gen), 0.0)
        grad_out, xc = torch.randn(B, D, generator=gen), torch.randn(B, D, generator=gen)
        by_feature = sort_pairs(indices, values, grad_val, F)
        chunks = chunk_sums(by_feature, grad_out, xc, chunk, block_p=2, block_d=32) if chunk else None
        step += 1
        fired = tied_feature_adam(by_feature, grad_out, xc, params, moments, lr, step, chunks=chunks)

        rows = torch.arange(B).repeat_interleave(k)
        flat = indices.reshape(-1)
        # the same gradient as autograd gives: x_hat = values W[idx] (decoder), z = xc . unit(W)[idx] (encoder)
        unit = torch.nn.functional.normalize(W64, dim=1)
        surrogate = (grad_out.double()[rows] * values.double().reshape(-1, 1) * W64[flat]).sum() \
            + (grad_val.double().reshape(-1) * (xc.double()[rows] * unit[flat]).sum(1)).sum()
        opt.zero_grad()
        surrogate.backward()
        opt.step()
        torch.testing.assert_close(params["W_dec"].double(), W64.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(params["W_enc_lp"].double(), torch.nn.functional.normalize(W64.detach(), dim=1), rtol=1e-5, atol=1e-6)
        assert torch.equal(fired, torch.zeros(F).index_add(0, flat, (values > 0).float().reshape(-1)))


def reference_train_step(model64, opt, x, weights=None, k_aux=0, aux_alpha=0.0):
    """sae.autograd_step.AutogradStep's sequence in float64; weights ([d_sae]): with the
    auxiliary loss of those weights (AuxK: 1 on the dead features)."""
    select_aux = None if weights is None else (lambda z: aux_candidates(z, weights.double(), k_aux))
    x_hat, _, aux_code = model64(x, select_aux)
    loss = (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    if weights is not None:
        loss = loss + aux_alpha * aux_reconstruction_loss(aux_code, (x - x_hat).detach(), weights.double(), model64.decode_directions)
    opt.zero_grad()
    loss.backward()
    model64.remove_parallel_decoder_grad()
    opt.step()
    model64.normalize_decoder()
    return loss


@pytest.mark.parametrize("pair_chunk", [32, 2])
@pytest.mark.parametrize("d_in,d_sae,k,B", [(24, 40, 4, 16), (37, 19, 19, 7)])
def test_fused_step_trains_like_the_trainer_in_float64(d_in, d_sae, k, B, pair_chunk):
    gen = torch.Generator().manual_seed(d_sae)
    model = SparseAutoencoder(d_in, d_sae, TopKRule(k))
    model.init_weights(gen, b_dec=torch.randn(d_in, generator=gen) * 0.1)
    model64 = copy.deepcopy(model).double()
    opt = torch.optim.Adam(model64.parameters(), lr=1e-2, foreach=False)
    model.make_encoder_feature_major()
    fused = FusedTopKStep(model, lr=1e-2, precision="fp32", pair_chunk=pair_chunk, backend="triton")
    for _ in range(3):
        x = torch.randn(B, d_in, generator=gen)
        stats = fused(x)
        loss = reference_train_step(model64, opt, x.double())
        torch.testing.assert_close(stats.loss.double(), loss.detach(), rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach().double(), getattr(model64, name).detach(), rtol=1e-4, atol=1e-5, msg=name)
    assert model.W_enc.t().is_contiguous()  # the model shares the step's feature-major storage


@pytest.mark.parametrize("n_dead,k_aux", [(9, 4), (3, 5)], ids=["more-dead-than-k_aux", "fewer"])
def test_fused_step_with_auxk_trains_like_the_trainer_in_float64(n_dead, k_aux):
    """AuxK's dense products over the dead features' columns against autograd's sparse aux code."""
    gen = torch.Generator().manual_seed(n_dead)
    model = SparseAutoencoder(21, 30, TopKRule(3))
    model.init_weights(gen, b_dec=torch.randn(21, generator=gen) * 0.1)
    model64 = copy.deepcopy(model).double()
    opt = torch.optim.Adam(model64.parameters(), lr=1e-2, foreach=False)
    model.make_encoder_feature_major()
    fused = FusedTopKStep(model, lr=1e-2, precision="fp32", k_aux=k_aux, aux_alpha=0.5, backend="triton")
    for _ in range(3):
        dead_features = torch.randperm(30, generator=gen)[:n_dead].sort().values
        dead = torch.zeros(30, dtype=torch.bool).index_fill_(0, dead_features, True)
        x = torch.randn(10, 21, generator=gen)
        aux = fused.prepare_aux(dead.float())
        ids, weights = aux  # a capacity of columns (sae.aux_capacity): the dead ones, then padding of weight 0
        assert torch.equal(ids[weights > 0], dead_features) and torch.equal(weights[weights > 0], torch.ones(n_dead))
        assert len(ids) > n_dead and torch.equal(ids, ids.unique())
        stats = fused(x, aux)
        loss = reference_train_step(model64, opt, x.double(), dead.float(), k_aux, aux_alpha=0.5)
        assert float(stats.aux) > 0
        torch.testing.assert_close(stats.loss.double(), loss.detach(), rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach().double(), getattr(model64, name).detach(), rtol=1e-4, atol=1e-5, msg=name)


def test_fused_step_with_graded_aux_weights_trains_like_the_trainer_in_float64():
    """aux_zipf's weights (deficits in (0, 1]) scale the aux activations and their gradient."""
    gen = torch.Generator().manual_seed(5)
    model = SparseAutoencoder(21, 30, TopKRule(3))
    model.init_weights(gen, b_dec=torch.randn(21, generator=gen) * 0.1)
    model64 = copy.deepcopy(model).double()
    opt = torch.optim.Adam(model64.parameters(), lr=1e-2, foreach=False)
    model.make_encoder_feature_major()
    fused = FusedTopKStep(model, lr=1e-2, precision="fp32", k_aux=4, aux_alpha=0.5, backend="triton")
    for _ in range(3):
        weights = torch.rand(30, generator=gen) * (torch.rand(30, generator=gen) < 0.5)
        x = torch.randn(10, 21, generator=gen)
        stats = fused(x, fused.prepare_aux(weights))
        loss = reference_train_step(model64, opt, x.double(), weights, 4, aux_alpha=0.5)
        torch.testing.assert_close(stats.loss.double(), loss.detach(), rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach().double(), getattr(model64, name).detach(), rtol=1e-4, atol=1e-5, msg=name)


def test_fused_step_refuses_what_it_cannot_train():
    with pytest.raises(SAEError, match="trains topk, mutual-choice, gba SAEs only"):
        FusedTopKStep(SparseAutoencoder(8, 16, JumpReLURule(torch.zeros(16))), lr=1e-3, backend="triton")
    with pytest.raises(SAEError, match="CUDA"):
        FusedTopKStep(SparseAutoencoder(8, 16, TopKRule(2)), lr=1e-3)  # the CPU's backend is torch
    with pytest.raises(SAEError, match="make_encoder_feature_major"):
        FusedTopKStep(SparseAutoencoder(8, 16, TopKRule(2)), lr=1e-3, backend="triton")
    with pytest.raises(SAEError, match="`precision`"):
        FusedTopKStep(SparseAutoencoder(8, 16, TopKRule(2)), lr=1e-3, precision="fp16", backend="triton")


def test_feature_adam_rounds_bf16_moments_stochastically_and_without_bias(poisoned):
    """bf16 moments track float32 ones: with gradients far below sqrt(v), Adam's second
    moment shrinks 0.1% a step, under half a bf16 ulp (0.2-0.4%); rounded to nearest it
    would stay where it started (+2% after 20 steps), rounded stochastically it follows."""
    gen = torch.Generator().manual_seed(3)
    F, D, B, k = 64, 300, 48, 8
    W_dec = torch.randn(F, D, generator=gen)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_enc_t = torch.randn(F, D, generator=gen)
    indices = torch.randint(0, F, (B, k), generator=gen)
    values, grad_val = torch.rand(B, k, generator=gen) + 0.1, 1e-3 * torch.randn(B, k, generator=gen)
    grad_out, xc = 1e-3 * torch.randn(B, D, generator=gen), torch.randn(B, D, generator=gen)
    by_feature = sort_pairs(indices, values, grad_val, F)
    db_enc = feature_sums(by_feature)
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        params = {"W_dec": W_dec.clone(), "W_enc_t": W_enc_t.clone(), "b_enc": torch.zeros(F)}
        params["W_enc_lp"] = params["W_enc_t"]
        moments = {n: (torch.zeros(F, D, dtype=dtype), torch.full((F, D), 0.25, dtype=dtype)) for n in ("W_dec", "W_enc_t")}
        moments["b_enc"] = (torch.zeros(F), torch.zeros(F))
        for step in range(1, 21):
            feature_adam(by_feature, grad_out, xc, params, moments, db_enc, torch.tensor([1e-4]), torch.tensor([float(step)]))
        runs[dtype] = moments
    for name in ("W_dec", "W_enc_t"):
        exact, rounded = runs[torch.float32][name][1].double(), runs[torch.bfloat16][name][1]
        assert rounded.dtype == torch.bfloat16
        assert float(exact.mean()) < 0.25 * 0.985  # what nearest rounding would not have left
        rel = rounded.double() / exact - 1  # each step's rounding adds a zero-mean error
        assert rel.abs().max() < 0.1 and abs(float(rel.mean())) < 1e-3
