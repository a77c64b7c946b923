"""The Triton sparse primitives (under TRITON_INTERPRET=1 on CPU) and their torch twins
against a float64 dense reference, with NaN-poisoned output buffers."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from sae.kernels import torch_sparse
from sae.kernels.triton_gather import gather_dot, gather_sum
from sae.kernels.triton_scatter import feature_scatter, sort_pairs_by_feature

# (B, k, n_features, D): D past one 256/128 block and not a multiple; k = 1; k past the
# 16/32-wide k blocks; more kept slots than features (forces repeats).
SHAPES = [(7, 1, 13, 37), (5, 3, 11, 300), (4, 40, 50, 20), (3, 9, 4, 5)]


def dense_codes(indices: torch.Tensor, coef: torch.Tensor, n_features: int) -> torch.Tensor:
    """The B x n_features float64 matrix the sparse pairs stand for (repeats add up)."""
    A = torch.zeros(indices.shape[0], n_features, dtype=torch.float64)
    return A.scatter_add_(1, indices, coef.double())


def make_case(B, k, F, D, seed):
    gen = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, F, (B, k), generator=gen)
    indices[0, :] = indices[0, 0]  # a row with one feature repeated k times
    coef = torch.randn(B, k, generator=gen)
    coef[-1] = 0.0  # an all-zero row (padding only)
    W = torch.randn(F, D, generator=gen)
    g = torch.randn(B, D, generator=gen)
    return indices, coef, W, g


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "an output element was left unwritten (NaN poison)"
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_gather_sum_matches_dense_product(shape, seed):
    B, k, F, D = shape
    indices, coef, W, _ = make_case(B, k, F, D, seed)
    ref = dense_codes(indices, coef, F) @ W.double()
    out = torch.full((B, D), float("nan"))
    gather_sum(indices, coef, W, torch.float32, out=out)
    assert rel_err(out, ref) < 1e-5
    assert rel_err(torch_sparse.gather_sum(indices, coef, W, torch.float32), ref) < 1e-5
    assert out[-1].abs().max() == 0  # the all-zero row decodes to exactly zero


@pytest.mark.parametrize("shape", SHAPES)
def test_gather_sum_through_transposed_weights(shape):
    B, k, F, D = shape
    indices, coef, W, _ = make_case(B, k, F, D, 3)
    W_strided = W.t().contiguous().t()  # same values, feature stride 1
    out = torch.full((B, D), float("nan"))
    gather_sum(indices, coef, W_strided, torch.float32, out=out)
    assert rel_err(out, dense_codes(indices, coef, F) @ W.double()) < 1e-5


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_gather_dot_matches_dense(shape, seed):
    B, k, F, D = shape
    indices, _, W, g = make_case(B, k, F, D, seed)
    ref = (g.double() @ W.double().t()).gather(1, indices)
    out = torch.full((B, k), float("nan"))
    gather_dot(indices, g, W, torch.float32, out=out)
    assert rel_err(out, ref) < 1e-5
    assert rel_err(torch_sparse.gather_dot(indices, g, W, torch.float32), ref) < 1e-5


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_feature_scatter_matches_transposed_dense_product(shape, seed):
    B, k, F, D = shape
    indices, coef, _, src = make_case(B, k, F, D, seed)
    A = dense_codes(indices, coef, F)
    ref, ref_sum = A.t() @ src.double(), A.sum(0)
    out = torch.full((F, D), float("nan"))
    coef_sum = torch.full((F,), float("nan"))
    order, offsets = sort_pairs_by_feature(indices, F)
    feature_scatter(order, offsets, k, coef, src, out, coef_sum)
    assert rel_err(out, ref) < 1e-5
    assert rel_err(coef_sum, ref_sum) < 1e-5
    unused = torch.ones(F, dtype=torch.bool)
    unused[indices.reshape(-1)] = False
    assert (out[unused] == 0).all()  # features with no pair get exact zero rows
    t_out, t_sum = torch.full((F, D), float("nan")), torch.full((F,), float("nan"))
    torch_sparse.feature_scatter(indices, coef, src, t_out, t_sum)
    assert rel_err(t_out, ref) < 1e-5 and rel_err(t_sum, ref_sum) < 1e-5


def test_feature_scatter_into_transposed_output():
    B, k, F, D = 6, 4, 9, 33
    indices, coef, _, src = make_case(B, k, F, D, 5)
    buf = torch.full((D, F), float("nan"))  # the layout of an encoder weight [d_in, d_sae]
    order, offsets = sort_pairs_by_feature(indices, F)
    feature_scatter(order, offsets, k, coef, src, buf.t())
    assert rel_err(buf.t(), dense_codes(indices, coef, F).t() @ src.double()) < 1e-5


@pytest.mark.parametrize("block_d,block_p", [(128, 16), (64, 2)])
def test_feature_scatter_over_several_d_blocks(block_d, block_p):
    B, k, F, D = 9, 7, 12, 300  # 300 = 2 * 128 + 44: the last D block is partial
    indices, coef, _, src = make_case(B, k, F, D, 11)
    A = dense_codes(indices, coef, F)
    out, coef_sum = torch.full((F, D), float("nan")), torch.full((F,), float("nan"))
    order, offsets = sort_pairs_by_feature(indices, F)
    feature_scatter(order, offsets, k, coef, src, out, coef_sum, block_d=block_d, block_p=block_p)
    assert rel_err(out, A.t() @ src.double()) < 1e-5
    assert rel_err(coef_sum, A.sum(0)) < 1e-5


@pytest.mark.parametrize("chunk", [1, 3, 256])
def test_feature_scatter_splits_a_busy_feature_into_runs(chunk):
    """Every token picks feature 0 (as an auxiliary loss's few candidates are): its pairs are
    summed in runs of `chunk` by several programs and must still add up exactly once."""
    B, k, F, D = 40, 3, 7, 20
    indices, coef, _, src = make_case(B, k, F, D, 3)
    indices[:, 0] = 0
    A = dense_codes(indices, coef, F)
    out, coef_sum = torch.full((F, D), float("nan")), torch.full((F,), float("nan"))
    order, offsets = sort_pairs_by_feature(indices, F)
    feature_scatter(order, offsets, k, coef, src, out, coef_sum, chunk=chunk)
    assert rel_err(out, A.t() @ src.double()) < 1e-5
    assert rel_err(coef_sum, A.sum(0)) < 1e-5
