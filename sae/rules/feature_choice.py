"""Feature Choice (Ayonrinde 2024, the transpose of TopK): each feature keeps its m largest
tokens of the batch, m = k*B/d_sae, so the batch holds k*B token-feature matches as Mutual
Choice's does, every feature takes part in every batch (none can die), and a token gets as
many features as choose it.

Training: per column of ReLU(z) [B, d_sae], the m = floor(k*B/d_sae) largest entries; where
k*B is not a multiple of d_sae, the remaining r = k*B - m*d_sae matches go to the r features
whose (m+1)-th value is largest, so the budget is exactly k*B. The kept (token, feature)
pairs are packed into rows by a sort of their token ids: no dense [B, d_sae] mask.
Inference has no batch: each feature f gets its own threshold theta_f, the estimate
BatchTopK's paper makes for its one threshold (the mean over batches of the smallest kept
value) taken per feature, with a correction for the few values a feature keeps per batch
(threshold_estimate), so f fires on about k/d_sae of the tokens and the mean L0 is about
k; tracked and calibrated over the run's last steps as Mutual Choice's
(sae.rules.mutual_choice.update_threshold). Saved to SAELens as
"jumprelu" with threshold theta. Registers the training rule "feature-choice" (autograd
step, one process: the selection is over the batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from sae.code import SparseCode, code_from_mask
from sae.errors import SAEError
from sae.registry import TrainingRule, register_rule
from sae.rules.base import SparsityRule
from sae.rules.mutual_choice import calibration_start, update_threshold
from sae.rules.topk import TopKConfig, expected_density

if TYPE_CHECKING:
    from sae.config import TrainConfig


def column_choice(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Feature Choice selection of z [B, d_sae] with budget k*B: tokens, features and
    values [n] of the n = k*B kept pairs (values ReLU(z), so 0 where a column has fewer
    positive entries than it keeps), and each feature's threshold estimate [d_sae]
    (threshold_estimate; inf where a feature keeps no token)."""
    B, d_sae = z.shape
    budget = min(k * B, B * d_sae)
    m, extra = divmod(budget, d_sae)
    values, tokens = z.topk(min(m + 1, B), dim=0, sorted=True)  # [m(+1), d_sae], largest first
    values = values.float()
    features = torch.arange(d_sae, device=z.device).expand_as(tokens)
    kept_t, kept_f, kept_v = tokens[:m].reshape(-1), features[:m].reshape(-1), values[:m].reshape(-1)
    if extra:
        winners = values[m].topk(extra, sorted=False).indices  # the features whose next value is largest
        kept_t = torch.cat([kept_t, tokens[m, winners]])
        kept_f = torch.cat([kept_f, winners])
        kept_v = torch.cat([kept_v, values[m, winners]])
    return kept_t, kept_f, kept_v.relu(), threshold_estimate(values, budget / d_sae)


def threshold_estimate(top: torch.Tensor, share: float) -> torch.Tensor:
    """Each feature's estimate of the value it exceeds on `share` tokens of a batch (share =
    k*B/d_sae, its mean number of kept tokens), from its largest values top [>= m, d_sae]
    (m = floor(share), top[m] the first dropped one where there is one): the m-th largest
    value moved toward the (m+1)-th by 1/2 + (share - m) of their gap. The m-th value alone,
    averaged over batches, sits about half a gap above the share's quantile (for an
    exponential tail, E[X_(m)] - E[X_(m+1)] = 1/m and E[X_(m)] = log(B/m) + 1/(2m)), which
    kept 6% under k at m = 8; the shift takes that bias out to first order. inf for m = 0."""
    m = int(share)
    if m == 0:
        return torch.full(top.shape[1:], torch.inf, device=top.device)
    if m >= top.shape[0]:
        return top[m - 1]
    return top[m - 1] - (0.5 + share - m) * (top[m - 1] - top[m])


def pack_rows(tokens: torch.Tensor, features: torch.Tensor, values: torch.Tensor, rows: int) -> SparseCode:
    """Pairs (token, feature, value) as a SparseCode of `rows` rows, each as wide as the
    fullest row (padding: value 0 at feature 0); pairs of value 0 are dropped. One host read
    (that width); the pairs are placed by a sort of their token ids, nothing [rows, d_sae]
    is made and no boolean indexing (another host read) is used."""
    active = values > 0
    counts = torch.zeros(rows, dtype=torch.long, device=tokens.device).index_add_(0, tokens, active.long())
    width = max(int(counts.max()), 1)
    # dropped pairs sort after every row (key `rows`), so each row's pairs are contiguous and first
    order = torch.argsort(torch.where(active, tokens, rows), stable=True)
    row, keep = tokens[order], active[order]
    slot = torch.arange(len(order), device=tokens.device) - (counts.cumsum(0) - counts)[row]
    dump = rows * width  # one extra cell takes the dropped pairs
    place = torch.where(keep, row * width + slot, dump)
    indices = torch.zeros(dump + 1, dtype=torch.long, device=tokens.device)
    packed = torch.zeros(dump + 1, dtype=values.dtype, device=tokens.device)
    indices[place] = features[order]
    packed[place] = values[order]
    return SparseCode(indices=indices[:dump].view(rows, width), values=packed[:dump].view(rows, width))


class FeatureChoiceRule(SparsityRule):
    """Each feature's top m tokens of the batch; per-feature inference thresholds (buffers)."""

    name = "feature-choice"
    saelens_architecture = "jumprelu"
    scale_free_selection = True

    def __init__(self, k: int, d_sae: int, theta_decay: float = 0.99, steps: int | None = None) -> None:
        """steps: the run's length, which places the thresholds' calibration window."""
        super().__init__()
        self.k = int(k)
        self.theta_decay = float(theta_decay)
        self.calibrate_from = calibration_start(steps)
        self.register_buffer("theta", torch.zeros(d_sae))
        self.register_buffer("theta_updates", torch.zeros(d_sae, dtype=torch.long))
        self._estimate: torch.Tensor | None = None

    def select(self, z: torch.Tensor) -> SparseCode:
        z = z.detach()
        tokens, features, values, estimate = column_choice(z, self.k)
        if self.training:
            self._estimate = estimate
        return pack_rows(tokens, features, values.to(z.dtype), z.shape[0])

    def after_step(self, model: nn.Module, step: int) -> None:
        """The thresholds take the estimates of the step just taken."""
        if self._estimate is not None:
            update_threshold(self.theta, self.theta_updates, self._estimate, step, self.calibrate_from, self.theta_decay)
            self._estimate = None

    def infer(self, z: torch.Tensor) -> SparseCode:
        return code_from_mask(z.relu(), z > self.theta)

    def saelens_tensors(self, d_sae: int) -> dict[str, torch.Tensor]:
        return {"threshold": self.theta.detach().clone()}


@dataclass
class FeatureChoiceConfig(TopKConfig):
    """k, the mean per token of the batch's budget (each feature takes k * batch-size / d_sae
    tokens), and the thresholds' EMA decay (theta_decay, shared with Mutual Choice)."""

    k: int | None = field(default=None, metadata={"help": "Mean active features per token (each feature keeps k * batch-size / d-sae tokens)."})
    theta_decay: float = field(default=0.99, metadata={"help": "EMA decay of the inference threshold before its final calibration."})

    def check(self, run: TrainConfig) -> None:
        super().check(run)
        if not 0 <= self.theta_decay <= 1:
            raise SAEError(f"`theta_decay={self.theta_decay}` must be between 0 and 1")
        if self.k * run.batch_size < run.d_sae:
            raise SAEError(f'`arch="feature-choice"` gives each feature k * batch_size / d_sae tokens, under one here '
                           f"(k={self.k}, batch_size={run.batch_size}, d_sae={run.d_sae}); raise `batch_size` or `k`")


register_rule(TrainingRule(
    name="feature-choice", config=FeatureChoiceConfig, default_aux="none", initial_density=expected_density,
    build=lambda settings, run: FeatureChoiceRule(settings.k, run.d_sae, theta_decay=settings.theta_decay, steps=run.steps),
    short_run_settings={"k": 16},
))
