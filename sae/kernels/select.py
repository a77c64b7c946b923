"""Selections that turn dense pre-activations z [B, d_sae] into sparse (values, indices).

All follow sae.kernels.encode's contract: values are the activation of z at the kept
indices (slope 1 where non-zero), padding entries have value 0, values are float32.
- topk_rows: each row keeps its k largest (TopK over ReLU): on CUDA the Triton select of
  sae.kernels.triton_topk (no sort; each row guesses its threshold from a sample, then
  one pass over z for most rows), on CPU torch.topk.
- batch_topk: the whole batch keeps its k*B largest (Mutual Choice / BatchTopK). Rows are
  first cut to their `cap` largest entries (cap >= k; default 4k; torch.topk, which at
  cap = 8k beats the Triton select of topk_rows), then one top-(k*B) over the B*cap
  candidates sets the batch threshold: no sort of all B x d_sae values. Exact whenever no
  row holds more than cap of the batch's k*B largest; `overflow` counts rows that may
  (their cap-th largest z reached the threshold), as a device tensor (no sync).
- batch_topk_entries: the same selection, exact, as flat entries in row order (RowEntries,
  CSR): exactly k*B of them whatever the rows' widths, so the fused step (sae.fused_step)
  walks k*B pairs instead of B rows padded to the widest: one torch.topk over all of z
  (no row cut first, so no overflow to check), with fixed shapes and no host read, so a
  CUDA graph captures it.
- mask_entries: the entries of a boolean mask over z as RowEntries (GBA's z > threshold
  in the fused step): one nonzero pass, whose count is the one host read.
- threshold_rows: keep z > theta per feature (JumpReLU; ReLU is theta = 0), at most cap
  per row (the cap largest margins), with the same overflow count.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sae.kernels.backend import resolve_backend


class Selected(NamedTuple):
    values: torch.Tensor
    indices: torch.Tensor
    threshold: torch.Tensor
    overflow: torch.Tensor


def topk_rows(z: torch.Tensor, k: int, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row, through ReLU: (float32 values, int64 indices).
    backend "triton" (None: on CUDA, sae.kernels.backend.resolve_backend) runs the Triton
    guess-and-verify select of sae.kernels.triton_topk (a pass near the read floor, where
    torch.topk sorts: bench/kernels_topk.py), "torch" torch.topk. Both are exact."""
    if resolve_backend(z.device, backend) == "triton":
        from sae.kernels.triton_topk import row_topk

        values, indices, _ = row_topk(z.contiguous(), k)
        return values, indices
    values, indices = z.topk(k, dim=1, sorted=False)
    return values.float().relu(), indices


def batch_topk(z: torch.Tensor, k: int, cap: int | None = None) -> Selected:
    """The k*B largest entries of the batch (ReLU), as rows padded to width cap; threshold
    is the smallest value kept (0 when fewer than k*B entries are positive)."""
    B, d_sae = z.shape
    cap = min(cap or 4 * k, d_sae)
    raw, indices = z.topk(cap, dim=1, sorted=False)
    raw = raw.float()
    cand, row_last = raw.relu(), raw.min(dim=1).values
    n_keep = min(k * B, cand.numel())
    threshold = cand.reshape(-1).topk(n_keep, sorted=False).values.min()
    keep = (cand >= threshold) & (cand > 0)
    values = torch.where(keep, cand, torch.zeros_like(cand))
    # a row whose cap-th largest z is below the threshold has all its winners among its cap
    overflow = (row_last >= threshold).sum() if cap < d_sae else torch.zeros((), device=z.device, dtype=torch.long)
    return Selected(values, indices, threshold, overflow)


class RowEntries(NamedTuple):
    """A code as flat entries in row order: row b's are [row_ptr[b], row_ptr[b + 1]).
    Entries of value 0 (a batch with fewer positive pre-activations than its budget) are
    padding: they add nothing to the decode or to any gradient."""

    values: torch.Tensor  # [P] float32, >= 0
    indices: torch.Tensor  # [P] int64: the feature
    rows: torch.Tensor  # [P] int32: the token row, ascending
    row_ptr: torch.Tensor  # [B + 1] int64


def batch_topk_entries(z: torch.Tensor, k: int) -> RowEntries:
    """The min(k*B, B*d_sae) largest entries of ReLU(z) [B, d_sae] as RowEntries, rows
    ascending and each row's columns ascending; entries of value 0 pad a batch with fewer
    positive entries than its budget. One torch.topk over the flattened z and a sort of the
    kept positions: exact, fixed shapes, nothing read on the host."""
    B, d_sae = z.shape
    values, flat = z.reshape(-1).topk(min(k * B, B * d_sae), sorted=False)
    flat, order = flat.sort()
    rows = flat // d_sae
    row_ptr = torch.searchsorted(rows, torch.arange(B + 1, device=z.device))
    return RowEntries(values[order].float().relu(), flat % d_sae, rows.to(torch.int32), row_ptr)


def mask_entries(z: torch.Tensor, keep: torch.Tensor) -> RowEntries:
    """ReLU(z) [B, d_sae] at the kept entries as RowEntries (each row's columns ascending).
    A batch that keeps nothing gets one padding entry (value 0 at row 0, feature 0), so
    the code is never empty."""
    rows, indices = keep.nonzero(as_tuple=True)  # row-major: rows ascending, columns within
    if rows.numel() == 0:
        rows = indices = torch.zeros(1, dtype=torch.long, device=z.device)
        values = torch.zeros(1, dtype=torch.float32, device=z.device)
    else:
        values = z[rows, indices].float().relu()
    row_ptr = torch.searchsorted(rows, torch.arange(z.shape[0] + 1, device=z.device))
    return RowEntries(values, indices, rows.to(torch.int32), row_ptr)


def threshold_rows(z: torch.Tensor, theta: torch.Tensor, cap: int) -> Selected:
    """Entries with z > theta[f] (JumpReLU form: the value is z itself), at most cap per row."""
    d_sae = z.shape[1]
    cap = min(cap, d_sae)
    margin = z.float() - theta.float()
    top_margin, indices = margin.topk(cap, dim=1, sorted=False)
    kept = top_margin > 0
    values = torch.where(kept, z.gather(1, indices).float(), torch.zeros_like(top_margin))
    overflow = kept.all(dim=1).sum() if cap < d_sae else torch.zeros((), device=z.device, dtype=torch.long)
    return Selected(values, indices, theta, overflow)
