"""Quality numbers every trained SAE reports, accumulated over a stream of batches:
FVU and explained variance, L0, dead fraction, per-feature density and its log10 histogram."""

from __future__ import annotations

from typing import Any

import torch

from sae.code import SparseCode

#: log10(density) bin edges for the histogram (dead features are counted apart).
LOG_DENSITY_EDGES = [float(e) for e in range(-8, 1)]


class ReconstructionStats:
    """Running sums over batches; nothing per token is kept."""

    def __init__(self, d_in: int, d_sae: int) -> None:
        self.d_sae = d_sae
        self.tokens = 0
        self.sq_err = 0.0
        self.sum_x = torch.zeros(d_in, dtype=torch.float64)
        self.sum_sq_x = 0.0
        self.active = 0
        self.fire_counts = torch.zeros(d_sae, dtype=torch.long)

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, code: SparseCode) -> None:
        x64 = x.double().cpu()
        self.tokens += len(x)
        self.sq_err += float((x.double() - x_hat.double()).pow(2).sum())
        self.sum_x += x64.sum(dim=0)
        self.sum_sq_x += float(x64.pow(2).sum())
        self.active += int(code.l0().sum())
        self.fire_counts += code.fired(self.d_sae).cpu()

    def result(self) -> dict[str, Any]:
        """fvu, explained_variance, l0, dead_fraction, tokens, log_density_histogram."""
        n = max(self.tokens, 1)
        total_var = self.sum_sq_x - float(self.sum_x.pow(2).sum()) / n
        fvu = self.sq_err / max(total_var, 1e-30)
        density = self.fire_counts.double() / n
        live = density[density > 0]
        hist = (
            torch.histogram(live.log10().clamp(LOG_DENSITY_EDGES[0], LOG_DENSITY_EDGES[-1]), torch.tensor(LOG_DENSITY_EDGES, dtype=torch.float64))[0]
            if len(live)
            else torch.zeros(len(LOG_DENSITY_EDGES) - 1)
        )
        return {
            "tokens": self.tokens,
            "fvu": fvu,
            "explained_variance": 1 - fvu,
            "l0": self.active / n,
            "dead_fraction": float((self.fire_counts == 0).double().mean()),
            "log_density_histogram": {
                "edges_log10": LOG_DENSITY_EDGES,
                "counts": [int(c) for c in hist.tolist()],
                "dead": int((self.fire_counts == 0).sum()),
            },
        }

    def density(self) -> torch.Tensor:
        """Per-feature firing frequency over the tokens seen, [d_sae]."""
        return self.fire_counts.double() / max(self.tokens, 1)
