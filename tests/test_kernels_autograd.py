"""sparse_decode and sparse_encode (both backends) against autograd through the dense
float64 formulation of the same SAE."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from sae.kernels import sparse_decode, sparse_encode, topk_rows

BACKENDS = ["triton", "torch"]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any()
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,k,d_sae,d_in", [(6, 1, 17, 40), (5, 24, 30, 9), (4, 6, 5, 300)])
def test_sparse_decode_grads_match_dense(backend, B, k, d_sae, d_in):
    gen = torch.Generator().manual_seed(B * k)
    indices = torch.randint(0, d_sae, (B, k), generator=gen)
    indices[1, :] = 2  # repeated feature within a row
    values = torch.randn(B, k, generator=gen)
    values[0] = 0.0  # an all-padding row
    W = torch.randn(d_sae, d_in, generator=gen)
    g = torch.randn(B, d_in, generator=gen)

    v, Wp = values.clone().requires_grad_(), W.clone().requires_grad_()
    out = sparse_decode(indices, v, Wp, backend=backend)
    out.backward(g)

    v64, W64 = values.double().requires_grad_(), W.double().requires_grad_()
    dense = torch.zeros(B, d_sae, dtype=torch.float64).scatter_add(1, indices, v64)
    ref = dense @ W64
    ref.backward(g.double())
    assert rel_err(out, ref) < 1e-5
    assert rel_err(v.grad, v64.grad) < 1e-5
    assert rel_err(Wp.grad, W64.grad) < 1e-5


def dense_sae_loss(x, W_enc, b_enc, b_dec, W_dec, indices, R):
    """The same SAE written densely: ReLU pre-activations masked to the kept indices."""
    z = (x - b_dec) @ W_enc + b_enc
    mask = torch.zeros_like(z).scatter(1, indices, 1.0)
    acts = z.relu() * mask
    x_hat = acts @ W_dec + b_dec
    return ((x_hat - x) ** 2).sum() + (acts * R).sum()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("feature_major", [True, False], ids=["feature-major", "row-major"])
@pytest.mark.parametrize("B,k,d_sae,d_in", [(7, 1, 19, 33), (5, 12, 23, 10), (3, 5, 40, 260)])
def test_sparse_encode_decode_grads_match_dense(backend, feature_major, B, k, d_sae, d_in):
    gen = torch.Generator().manual_seed(d_sae + k)
    x = torch.randn(B, d_in, generator=gen)
    x[-1] = 0.0  # an all-zero input row
    W_enc = torch.randn(d_in, d_sae, generator=gen) / d_in**0.5
    if feature_major:
        W_enc = W_enc.t().contiguous().t()
    b_enc = torch.randn(d_sae, generator=gen) * 0.1
    b_dec = torch.randn(d_in, generator=gen) * 0.1
    W_dec = torch.randn(d_sae, d_in, generator=gen) / d_sae**0.5
    R = torch.randn(B, d_sae, generator=gen)
    params = [t.clone().requires_grad_() for t in (x, W_enc, b_enc, b_dec, W_dec)]
    xp, W_encp, b_encp, b_decp, W_decp = params

    values, indices = sparse_encode(xp, W_encp, b_encp, b_decp, lambda z: topk_rows(z, k), backend=backend)
    x_hat = sparse_decode(indices, values, W_decp, backend=backend) + b_decp
    loss = ((x_hat - xp) ** 2).sum() + (values * R.gather(1, indices)).sum()
    loss.backward()

    ref_params = [t.double().requires_grad_() for t in (x, W_enc, b_enc, b_dec, W_dec)]
    ref_loss = dense_sae_loss(*ref_params, indices, R.double())
    ref_loss.backward()
    z64 = (x.double() - b_dec.double()) @ W_enc.double() + b_enc.double()
    assert torch.equal(indices.sort(1).values, z64.topk(k, dim=1).indices.sort(1).values)
    assert rel_err(loss.detach(), ref_loss.detach()) < 1e-5
    for got, ref in zip(params, ref_params):
        assert rel_err(got.grad, ref.grad) < 1e-5
    assert W_encp.grad.stride() == W_encp.stride()  # the gradient is laid out like the weight


def test_sparse_encode_leaves_data_without_grad():
    x = torch.randn(4, 8)
    W_enc = torch.randn(8, 16, requires_grad=True)
    b_enc = torch.zeros(16, requires_grad=True)
    b_dec = torch.zeros(8)
    values, indices = sparse_encode(x, W_enc, b_enc, b_dec, lambda z: topk_rows(z, 3))
    values.sum().backward()
    assert x.grad is None and W_enc.grad is not None and b_enc.grad is not None
    assert not indices.requires_grad
