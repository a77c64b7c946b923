"""Reconstruction metrics of an SAE over a stream of activations.

FVU, explained variance, L0, dead fraction and the log-density histogram, accumulated chunk
by chunk (sae.metrics.ReconstructionStats), so any source that yields [n, d_in] activation
chunks can be evaluated without holding it in memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from sae.errors import SAEError
from sae.metrics import ReconstructionStats
from sae.model import SparseAutoencoder


@torch.no_grad()
def reconstruction_metrics(sae: SparseAutoencoder, chunks: Iterable[torch.Tensor], device: str = "cpu") -> dict[str, Any]:
    """FVU, explained variance, L0, dead fraction and log-density histogram over the
    activation chunks [n, d_in], streamed."""
    stats = ReconstructionStats(sae.d_in, sae.d_sae)
    sae = sae.to(device).eval()
    for x in chunks:
        x = x.to(device)
        code = sae.encode(x)
        stats.update(x, sae.decode(code), code)
    if stats.tokens == 0:
        raise SAEError("no activations to evaluate: the chunks hold no tokens")
    return stats.result()
