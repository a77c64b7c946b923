"""Losses: FVU against its definition, AuxK's gradient reaching the encoder, and aux_zipf
against a direct, loop-by-loop computation of its formula."""

from __future__ import annotations

import math

import pytest
import torch

from sae.code import SparseCode
from sae.losses import aux_candidates, aux_reconstruction_loss, aux_zipf_loss, auxk_loss, fvu, zipf_underuse
from sae.model import SparseAutoencoder
from sae.rules import TopKRule

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_fvu_is_unexplained_over_total_variance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g) * 3 + 1
    x_hat = x + 0.1 * torch.randn(50, 8, generator=g)
    direct = sum(float((x[i] - x_hat[i]).pow(2).sum()) for i in range(50)) / sum(
        float((x[i] - x.mean(0)).pow(2).sum()) for i in range(50)
    )
    assert float(fvu(x, x_hat)) == pytest.approx(direct, rel=1e-5)
    assert float(fvu(x, x.mean(0).expand_as(x))) == pytest.approx(1.0)


def test_auxk_gradient_reaches_the_encoder_of_dead_features_only():
    """Through the fused encoder the trainer uses (sae.kernels.sparse_encode): the aux entries
    are selected in the same pass and their gradient must reach W_enc and b_enc."""
    g = torch.Generator().manual_seed(1)
    model = SparseAutoencoder(16, 64, TopKRule(4))
    model.init_weights(g)
    x = torch.randn(128, 16, generator=g)
    dead = torch.zeros(64)
    dead[40:] = 1.0
    model.backend = "triton"  # the CUDA path, run here by Triton's interpreter
    x_hat, code, aux_code = model(x, lambda z: aux_candidates(z, dead, 8))
    assert aux_code.width == 8 and bool((aux_code.indices >= 40).all())
    loss = aux_reconstruction_loss(aux_code, (x - x_hat).detach(), dead, model.decode_directions)
    assert float(loss.detach()) > 0
    loss.backward()
    grad = model.W_enc.grad
    assert grad is not None and float(grad[:, 40:].abs().sum()) > 0
    assert float(grad[:, :40].abs().sum()) == 0.0
    assert float(model.b_enc.grad[40:].abs().sum()) > 0
    assert float(model.W_dec.grad[40:].abs().sum()) > 0
    # the same loss from a dense z (the reference form), and through the CPU path, agree
    z = model.pre_acts(x)
    reference = auxk_loss(z, (x - x_hat).detach(), dead.bool(), model.W_dec, k_aux=8, code=code)
    assert float(reference.detach()) == pytest.approx(float(loss.detach()), rel=1e-5)
    fused_grad = grad.clone()
    model.zero_grad()
    model.backend = "torch"
    x_hat, _, aux_code = model(x, lambda z: aux_candidates(z, dead, 8))
    aux_reconstruction_loss(aux_code, (x - x_hat).detach(), dead, model.decode_directions).backward()
    torch.testing.assert_close(model.W_enc.grad, fused_grad, rtol=1e-4, atol=1e-6)


def test_auxk_is_zero_without_dead_features():
    model = SparseAutoencoder(8, 32, TopKRule(2))
    model.init_weights(torch.Generator().manual_seed(2))
    x = torch.randn(10, 8)
    x_hat, _, _ = model(x)
    z = model.pre_acts(x)
    assert float(auxk_loss(z, (x - x_hat).detach(), torch.zeros(32, dtype=torch.bool), model.W_dec, 4)) == 0.0


def direct_aux_zipf(z, residual, density, W_dec, k_aux, fit_fraction):
    """The documented formula, one feature and one token at a time."""
    d_sae = len(density)
    order = sorted(range(d_sae), key=lambda i: -float(density[i]))
    rank = {i: r + 1 for r, i in enumerate(order)}
    live = [i for i in order if density[i] > 0]
    n_fit = int(len(live) * fit_fraction)
    xs = [math.log(r) for r in range(1, n_fit + 1)]
    ys = [math.log(float(density[order[r - 1]])) for r in range(1, n_fit + 1)]
    mx, my = sum(xs) / n_fit, sum(ys) / n_fit
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
    log_a = my - slope * mx
    u = [min(max(1 - float(density[i]) / math.exp(log_a + slope * math.log(rank[i])), 0.0), 1.0) for i in range(d_sae)]
    u = [0.0 if value < 1e-3 else value for value in u]
    cut = sorted(u, reverse=True)[d_sae // 4 - 1]  # the quarter furthest below the curve, ties kept
    u = [value if value >= cut else 0.0 for value in u]
    candidates = [i for i in range(d_sae) if u[i] > 0]
    num = 0.0
    mean_e = residual.mean(0)
    den = float((residual - mean_e).pow(2).sum())
    for b in range(len(z)):
        chosen = sorted(candidates, key=lambda i: -float(z[b, i]))[: min(k_aux, len(candidates))]
        e_hat = sum(u[i] * max(float(z[b, i]), 0.0) * W_dec[i] for i in chosen)
        num += float((e_hat - residual[b]).pow(2).sum())
    return num / den, u


def test_aux_zipf_matches_a_direct_computation_of_its_formula():
    g = torch.Generator().manual_seed(3)
    d_sae, d_in = 40, 6
    ranks = torch.arange(1, d_sae + 1, dtype=torch.float64)
    density = (0.3 * ranks.pow(-1.1)).float()
    density[30:] *= 0.2  # the low end falls below the Zipf curve: under-used
    density[36:] = 0.0  # and a few are dead
    density = density[torch.randperm(d_sae, generator=g)]
    z = torch.randn(12, d_sae, generator=g)
    residual = torch.randn(12, d_in, generator=g)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    ours = aux_zipf_loss(z, residual, density, W_dec, k_aux=5, fit_fraction=0.8)
    direct, u = direct_aux_zipf(z, residual, density, W_dec, 5, 0.8)
    assert float(ours) == pytest.approx(direct, rel=1e-4)
    torch.testing.assert_close(zipf_underuse(density, 0.8), torch.tensor(u, dtype=torch.float32), atol=1e-5, rtol=0)
    weights = zipf_underuse(density, 0.8)
    assert torch.all(weights[density == 0] == 1.0)
    assert int((weights > 0).sum()) > int((density == 0).sum())  # under-used, not only dead
    assert int((weights > 0).sum()) == d_sae // 4  # at most a quarter of them


def test_zipf_underuse_keeps_every_dead_feature_when_more_than_a_quarter_are_dead():
    density = 0.3 * torch.arange(1, 41, dtype=torch.float32).pow(-1.1)
    density[25:] = 0.0  # 15 of 40 dead: more than the quarter
    weights = zipf_underuse(density, 0.8)
    assert torch.equal(weights > 0, density == 0) and torch.all(weights[density == 0] == 1.0)


def test_aux_zipf_reduces_to_auxk_when_only_dead_features_are_below_the_curve():
    g = torch.Generator().manual_seed(4)
    ranks = torch.arange(1, 33, dtype=torch.float64)
    density = (0.2 * ranks.pow(-1.0)).float()
    density[28:] = 0.0
    z = torch.randn(9, 32, generator=g)
    residual = torch.randn(9, 5, generator=g)
    W_dec = torch.randn(32, 5, generator=g)
    weights = zipf_underuse(density, fit_fraction=1.0)
    assert torch.equal(weights > 0, density == 0)
    zipf = aux_zipf_loss(z, residual, density, W_dec, k_aux=3, fit_fraction=1.0)
    auxk = auxk_loss(z, residual, density == 0, W_dec, k_aux=3)
    assert float(zipf) == pytest.approx(float(auxk), rel=1e-4)


@pytest.mark.parametrize("n_candidates", [0, 5, 40, 64])
def test_aux_candidates_are_the_largest_z_among_weighted_features(n_candidates):
    """Per row, the k_aux weighted features of largest z: the same set as a top-k over z with
    the other features masked to -inf (what it avoids building), for none, some and all."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(32, 64, generator=g)
    weights = torch.zeros(64)
    weights[torch.randperm(64, generator=g)[:n_candidates]] = torch.rand(n_candidates, generator=g) + 0.1
    chosen = aux_candidates(z, weights, 8)
    assert chosen.shape == (32, min(8, n_candidates))
    if n_candidates:
        masked = torch.where(weights > 0, z, torch.full_like(z, -torch.inf))
        expected = masked.topk(min(8, n_candidates), dim=1).indices
        assert torch.equal(chosen.sort(dim=1).values, expected.sort(dim=1).values)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_aux_entries_leave_out_each_token_s_own_code(backend):
    """With every feature a candidate (aux_zipf's under-used features are live), a token's aux
    entries are features its own code does not hold: no feature fits x and the residual on
    the same token."""
    g = torch.Generator().manual_seed(6)
    model = SparseAutoencoder(16, 24, TopKRule(5))
    model.init_weights(g)
    model.backend = backend
    x = torch.randn(64, 16, generator=g)
    weights = torch.ones(24)
    _, code, aux_code = model(x, lambda z: aux_candidates(z, weights, 8))
    for main, aux, values in zip(code.indices.tolist(), aux_code.indices.tolist(), aux_code.values.tolist()):
        assert not set(main) & {f for f, v in zip(aux, values) if v > 0}
    # TopK kept each row's largest: what is left for the aux is no larger than the row's smallest kept
    assert bool((aux_code.values.detach().max(dim=1).values <= code.values.detach().min(dim=1).values + 1e-6).all())
    z = model.pre_acts(x)
    own_out = SparseCode(indices=code.indices, values=code.values.detach()).outside(z)
    assert torch.isinf(own_out.gather(1, code.indices)).all() and torch.isfinite(own_out).sum() == 64 * (24 - 5)
