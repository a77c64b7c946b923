"""Ground truth for SAE training: known features in superposition, and how well an SAE finds them.

Data model (as in the GBA paper's statistical framework): n unit-norm features V [n, d] with
n > d, sparse non-negative codes H [tokens, n] where feature i is on with probability p_i
(balanced: all equal; Zipf: p_i proportional to i^-a), values uniform on [0.5, 1.5] or
exponential with mean 1, data X = H V plus optional Gaussian noise. The GBA paper's
imbalanced case is imbalanced per token instead: each token draws its number of active
features s from a list (half s=3, half s=20), then s features uniformly (`sparsities`).
Recovery: match decoder rows to true features by |cosine| with the Hungarian algorithm
(scipy linear_sum_assignment) and report the Feature Recovery Rate above 0.9 and 0.8 and
the mean matched cosine.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from scipy.optimize import linear_sum_assignment

from sae.data import _seeded
from sae.errors import SAEError


def feature_frequencies(n: int, mean_active: float, kind: str = "balanced", zipf_exponent: float = 1.0) -> torch.Tensor:
    """p_i (sum = mean_active features on per token): equal, or Zipf-shaped i^-a, capped at 1."""
    if kind == "balanced":
        p = torch.full((n,), mean_active / n)
    elif kind == "zipf":
        w = torch.arange(1, n + 1, dtype=torch.float64).pow(-zipf_exponent)
        p = (w / w.sum() * mean_active).float()
    else:
        raise SAEError(f"unknown frequency kind '{kind}': use balanced or zipf")
    return p.clamp(max=1.0)


@dataclass
class SyntheticFeatures:
    """The ground truth: features V [n, d], on-probabilities p [n], value law and noise."""

    V: torch.Tensor
    p: torch.Tensor
    values: str = "uniform"
    noise: float = 0.0
    #: If set, each token has exactly s active features, s drawn uniformly from this tuple
    #: (features uniform; p is then mean(s)/n for every feature).
    sparsities: tuple[int, ...] | None = None

    @classmethod
    def make(
        cls, n: int, d: int, mean_active: float, kind: str = "balanced", zipf_exponent: float = 1.0,
        values: str = "uniform", noise: float = 0.0, seed: int = 0,
    ) -> SyntheticFeatures:
        g = torch.Generator().manual_seed(seed)
        V = torch.randn(n, d, generator=g)
        V = V / V.norm(dim=1, keepdim=True)
        return cls(V=V, p=feature_frequencies(n, mean_active, kind, zipf_exponent), values=values, noise=noise)

    @classmethod
    def mixed_sparsity(cls, n: int, d: int, sparsities: tuple[int, ...], values: str = "uniform", seed: int = 0) -> SyntheticFeatures:
        """The GBA paper's imbalanced case (n=128, d=42, sparsities (3, 20))."""
        if not sparsities or not all(0 < s <= n for s in sparsities):
            raise SAEError(f"each sparsity must be between 1 and n={n}, got {sparsities}")
        base = cls.make(n, d, 1.0, values=values, seed=seed)
        mean = sum(sparsities) / len(sparsities)
        return cls(V=base.V, p=torch.full((n,), mean / n), values=values, sparsities=tuple(int(s) for s in sparsities))

    def _on(self, tokens: int, generator: torch.Generator) -> torch.Tensor:
        """Bool [tokens, n]: which features each token has."""
        n = self.V.shape[0]
        draw = torch.rand(tokens, n, generator=generator)
        if self.sparsities is None:
            return draw < self.p
        choice = torch.randint(len(self.sparsities), (tokens,), generator=generator)
        s = torch.tensor(self.sparsities)[choice]
        cutoff = draw.sort(dim=1).values.gather(1, (s - 1)[:, None])
        return draw <= cutoff

    def sample(self, tokens: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(X [tokens, d], H [tokens, n])."""
        n, d = self.V.shape
        on = self._on(tokens, generator)
        if self.values == "uniform":
            mags = 0.5 + torch.rand(tokens, n, generator=generator)
        elif self.values == "exponential":
            mags = torch.empty(tokens, n).exponential_(1.0, generator=generator)
        else:
            raise SAEError(f"unknown value law '{self.values}': use uniform or exponential")
        H = on * mags
        X = H @ self.V
        if self.noise > 0:
            X = X + self.noise * torch.randn(tokens, d, generator=generator) / d**0.5
        return X, H


class SyntheticSource:
    """An endless stream of synthetic batches; batch b depends only on (seed, b)."""

    def __init__(self, features: SyntheticFeatures, seed: int = 0) -> None:
        self.features, self.seed = features, seed
        self.d_in = int(features.V.shape[1])

    def batches(self, batch_size: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        b = start_batch
        while True:
            yield self.features.sample(batch_size, _seeded(self.seed, b))[0]
            b += 1

    def describe(self) -> dict[str, Any]:
        n, d = self.features.V.shape
        return {"source": "synthetic", "n_features": int(n), "d": int(d), "mean_active": float(self.features.p.sum())}


def recovery(W_dec: torch.Tensor, V: torch.Tensor) -> dict[str, float]:
    """Hungarian matching of true features to decoder rows by |cosine|.

    Returns frr_0.9 / frr_0.8 (fraction of true features whose matched row has |cos| above
    the level) and mean_cos (mean matched |cos| over true features).
    """
    a = V / V.norm(dim=1, keepdim=True)
    b = W_dec / W_dec.norm(dim=1, keepdim=True).clamp(min=1e-12)
    cos = (a @ b.T).abs().double().cpu().numpy()
    rows, cols = linear_sum_assignment(-cos)
    matched = torch.zeros(V.shape[0], dtype=torch.float64)
    matched[torch.as_tensor(rows)] = torch.as_tensor(cos[rows, cols])
    return {
        "frr_0.9": float((matched > 0.9).double().mean()),
        "frr_0.8": float((matched > 0.8).double().mean()),
        "mean_cos": float(matched.mean()),
    }
