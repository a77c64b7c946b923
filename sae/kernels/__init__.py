"""Fused sparse kernels for SAE training: Triton on CUDA, plain torch on CPU.

sparse_decode: k decoder rows per token, backward per feature (no dense B x d_sae).
sparse_encode: dense encoder product + selection, backward over the kept entries only.
topk_rows / batch_topk (batch_topk_entries) / threshold_rows / mask_entries: the selections of TopK, Mutual Choice and GBA.
triton_decode_residual / triton_feature_adam / triton_tied_adam: the kernels of sae.fused_step
(no autograd: the decoder with its loss gradient, the per-feature backward fused with Adam).
"""

from sae.kernels.decode import sparse_decode
from sae.kernels.encode import sparse_encode
from sae.kernels.select import RowEntries, Selected, batch_topk, batch_topk_entries, mask_entries, threshold_rows, topk_rows

__all__ = ["sparse_decode", "sparse_encode", "topk_rows", "batch_topk", "batch_topk_entries", "threshold_rows", "mask_entries", "Selected",
           "RowEntries"]
