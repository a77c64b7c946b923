"""Reconstruction metrics of an SAE over a stream of activations.

FVU, explained variance, L0, dead fraction and the log-density histogram, accumulated chunk
by chunk (sae.metrics.ReconstructionStats), so any source that yields [n, d_in] activation
chunks can be evaluated without holding it in memory. A transcoder's chunks are (input,
target) pairs, and its metrics are those of the target's prediction.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from sae.errors import SAEError
from sae.metrics import ReconstructionStats
from sae.model import SparseAutoencoder


@torch.no_grad()
def reconstruction_metrics(
    sae: SparseAutoencoder, chunks: Iterable[torch.Tensor | tuple[torch.Tensor, torch.Tensor]], device: str = "cpu"
) -> dict[str, Any]:
    """FVU, explained variance, L0, dead fraction and log-density histogram over the
    activation chunks [n, d_in] (a transcoder's: (input [n, d_in], target [n, d_out])
    pairs), streamed."""
    stats = ReconstructionStats(sae.d_out, sae.d_sae)
    sae = sae.to(device).eval()
    for chunk in chunks:
        x, target = chunk if isinstance(chunk, tuple) else (chunk, chunk)
        x = x.to(device)
        code = sae.encode(x)
        stats.update(target.to(device), sae.output(x, code), code)
    if stats.tokens == 0:
        raise SAEError("no activations to evaluate: the chunks hold no tokens")
    return stats.result()
