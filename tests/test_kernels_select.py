"""The selections (TopK rows, batch top-k, thresholds) against dense references."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from sae.errors import SAEError
from sae.kernels import batch_topk, batch_topk_entries, mask_entries, threshold_rows, topk_rows
from sae.kernels.triton_topk import row_topk


def dense(values: torch.Tensor, indices: torch.Tensor, d_sae: int) -> torch.Tensor:
    return torch.zeros(values.shape[0], d_sae, dtype=torch.float64).scatter_add(1, indices, values.double())


@pytest.mark.parametrize("method", ["stream", "split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,N,k", [(5, 37, 1), (4, 300, 9), (3, 50, 50), (2, 1100, 64)])
def test_triton_row_topk_keeps_the_k_largest(method, dtype, B, N, k):
    gen = torch.Generator().manual_seed(N + k)
    z = torch.randn(B, N, generator=gen).to(dtype)
    z[0] = z[0, 3]  # a row of ties: any k of them, each once
    z[1, : N // 2] = -1.0  # negatives and ties below the k-th
    got = row_topk(z, k, method=method, chunk=64, segment=128)
    check_row_topk(z, k, *got)
    if method == "split":  # the same entries in the same (column) order, ties included
        assert all(torch.equal(a, b) for a, b in zip(got, row_topk(z, k, method="stream", chunk=64)))


def check_row_topk(z, k, v, i, kth):
    values, indices, kths = torch.full(v.shape, float("nan")), torch.full(i.shape, -1), torch.full(kth.shape, float("nan"))
    values.copy_(v), indices.copy_(i), kths.copy_(kth)
    ref = z.double().topk(k, dim=1).values
    assert not values.isnan().any() and (indices >= 0).all() and not kths.isnan().any()
    assert torch.equal(z.double().gather(1, indices).sort(1).values, ref.sort(1).values)
    assert torch.equal(values.double().sort(1).values, ref.relu().sort(1).values)
    assert torch.equal(kths.double(), ref[:, -1])
    assert all(len(set(row.tolist())) == k for row in indices)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_row_topk_split_is_exact_when_rows_fall_back(dtype):
    B, N, k = 8, 5000, 3
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(B, N, generator=gen)
    z[2] = 0.25  # all ties: the count above the guess overflows, the row falls back
    z[6, :50] = -5.0
    z[7, 4200:4300] += 4.0  # unseen by the guess's sample (the first 4096 columns): the candidates overflow
    check_row_topk(z.to(dtype), k, *row_topk(z.to(dtype), k, method="split", chunk=256, segment=256))


def test_triton_row_topk_split_falls_back_when_the_guess_is_too_high():
    B, N, k = 2, 20480, 5  # the guess ranks 4 of the first 4096 columns: 4 < k above it
    z = torch.randn(B, N, generator=torch.Generator().manual_seed(3))
    z[1, :4096] += 3.0  # the sample is the row's top: fewer than k columns lie above the guess
    check_row_topk(z.to(torch.bfloat16), k, *row_topk(z.to(torch.bfloat16), k, method="split", chunk=1024))


def test_topk_rows_triton_agrees_with_torch():
    z = torch.randn(8, 300, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dense(*topk_rows(z, 4, backend="triton"), 300), dense(*topk_rows(z, 4), 300))


def test_bad_kernel_input_is_an_error_naming_the_parameter():
    z = torch.randn(8, 30)
    with pytest.raises(SAEError, match="`k=31` must be between 1 and the 30 columns of `z`"):
        topk_rows(z, 31, backend="triton")
    with pytest.raises(SAEError, match="`z` must have contiguous rows"):
        row_topk(z.t(), 2)
    with pytest.raises(SAEError, match='unknown `backend="cuda"`'):
        topk_rows(z, 2, backend="cuda")


@pytest.mark.parametrize("cap", [None, 1000])
def test_batch_topk_matches_dense_batch_selection(cap):
    B, d_sae, k = 16, 120, 5
    z = torch.randn(B, d_sae, generator=torch.Generator().manual_seed(1))
    z[3] += 2.0  # one "hard" row that wins many of the batch's slots
    sel = batch_topk(z, k, cap=cap)
    acts = z.double().relu().reshape(-1)
    keep = torch.zeros_like(acts).index_fill_(0, acts.topk(k * B).indices, 1.0)
    ref = (acts * keep).reshape(B, d_sae)
    got = dense(sel.values, sel.indices, d_sae)
    if int(sel.overflow) == 0:
        assert torch.equal(got, ref)
        assert torch.isclose(sel.threshold.double(), ref[ref > 0].min())
    else:  # with the default cap 4k the hard row overflows: it is reported, never hidden
        assert cap is None
        assert int((sel.values > 0).sum()) == k * B


def test_batch_topk_reports_overflow_and_is_exact_without_it():
    B, d_sae, k = 8, 64, 2
    z = torch.randn(B, d_sae, generator=torch.Generator().manual_seed(2))
    z[0] += 10.0  # row 0 holds all k*B largest: more than cap = 4k
    assert int(batch_topk(z, k).overflow) >= 1
    sel = batch_topk(z, k, cap=d_sae)
    assert int(sel.overflow) == 0 and int((sel.values > 0).sum()) == k * B


def test_threshold_rows_is_jumprelu():
    B, d_sae = 10, 90
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(B, d_sae, generator=gen)
    theta = torch.rand(d_sae, generator=gen)
    sel = threshold_rows(z, theta, cap=d_sae)
    assert torch.equal(dense(sel.values, sel.indices, d_sae), (z * (z > theta)).double())
    small = threshold_rows(z, theta, cap=3)
    assert int(small.overflow) == int(((z > theta).sum(1) >= 3).sum())


def check_batch_entries(code, z, k):
    """code holds the k*B largest entries of ReLU(z) (as a multiset of values: ties may go
    either way), each at its own position with its own value, rows in order, row_ptr right."""
    B, D = z.shape
    n = min(k * B, B * D)
    assert code.values.numel() == n
    assert torch.equal(code.values.sort().values, z.float().relu().reshape(-1).topk(n).values.sort().values)
    positions = code.rows.long() * D + code.indices
    assert positions.unique().numel() == n
    assert torch.equal(code.values, z.float().relu().reshape(-1)[positions])
    assert torch.equal(positions, positions.sort().values)  # row order, columns ascending in a row
    assert torch.equal(code.row_ptr[1:] - code.row_ptr[:-1], torch.bincount(code.rows.long(), minlength=B))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_topk_entries_are_the_batchs_k_times_B_largest_in_row_order(dtype):
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(16, 300, generator=gen)
    z[2] += 4.0  # one row holds most of the winners
    z[5] = -1.0  # a row that keeps nothing
    code = batch_topk_entries(z.to(dtype), 4)
    check_batch_entries(code, z.to(dtype), 4)
    assert code.row_ptr[6] == code.row_ptr[5] and code.row_ptr[3] - code.row_ptr[2] > 32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_topk_entries_pad_with_zeros_when_too_few_are_positive(dtype):
    z = -torch.ones(4, 10)
    z[0, 3], z[2, 7] = 2.0, 1.0
    code = batch_topk_entries(z.to(dtype), 2)
    assert code.values.numel() == 8
    assert sorted(code.values.tolist()) == [0.0] * 6 + [1.0, 2.0]
    check_batch_entries(code, z.to(dtype), 2)


def test_batch_topk_entries_split_ties_at_the_threshold():
    """Ties at the k*B-th value fill the budget exactly (which of them is torch.topk's choice)."""
    z = torch.full((8, 50), 0.25, dtype=torch.bfloat16)
    z[0, :3] = 1.0
    code = batch_topk_entries(z, 3)
    check_batch_entries(code, z, 3)
    assert int((code.values == 1.0).sum()) == 3 and int((code.values == 0.25).sum()) == 21


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_entries_hold_the_kept_entries_row_by_row(dtype):
    """GBA's z > threshold as flat entries: each row's kept columns in order, row_ptr its
    bounds, values float32; an empty row has none, and a batch that keeps nothing gets one
    padding entry of value 0."""
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(7, 40, generator=gen).to(dtype)
    theta = torch.rand(40, generator=gen)
    keep = z > theta
    keep[2] = False
    code = mask_entries(z, keep)
    rows, cols = keep.nonzero(as_tuple=True)
    assert torch.equal(code.rows.long(), rows) and torch.equal(code.indices, cols)
    assert code.values.dtype == torch.float32 and torch.equal(code.values, z[rows, cols].float())
    assert torch.equal(code.row_ptr.diff(), keep.sum(dim=1))
    assert code.row_ptr[2] == code.row_ptr[3]
    nothing = mask_entries(z, torch.zeros_like(keep))
    assert nothing.values.tolist() == [0.0] and nothing.row_ptr.tolist() == [0] + [1] * 7
