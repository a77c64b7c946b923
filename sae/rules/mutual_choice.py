"""Mutual Choice (Ayonrinde 2024; the same operation as BatchTopK): one budget of k*B
token-feature matches for the whole batch, so hard tokens get more features, easy ones fewer.

Training: keep the k*B largest entries of ReLU(z) over the whole [B, d_sae] matrix.
Inference has no batch, so the rule keeps a threshold theta and uses the JumpReLU form
f(z) = z * [z > theta] (saved to SAELens as architecture "jumprelu" with threshold theta).
theta is BatchTopK's estimate (Bussmann et al. 2024): the mean over training batches of the
smallest value each batch kept. The weights move while they train, so a mean over the whole
run lags behind them (its inference L0 came out a fifth under k); the rule tracks an
exponential moving average (what a checkpoint mid-run holds) and, over the last
CALIBRATION_FRACTION of the run's steps, where the learning rate has decayed, takes the
plain mean of those steps' minima instead (update_threshold), so the saved threshold is the
estimate on the final weights.

TopK start: over the first TOPK_START_FRACTION of the run's steps the rule keeps each token's
k largest entries (TopK, the same budget k*B), then the batch budget. From a random start the
batch budget goes to the tokens and latents with the largest pre-activations, so tokens with
few active features (where a rare feature is seen with the least interference) get few or no
latents and rare features are learned late or never; the TopK start lets features form first,
and the batch budget then reallocates them between tokens (docs/methods.md has the synthetic
recovery with and without it). Registers the training rule "mutual-choice" (autograd and
fused steps, one process: fused_select is the fused step's selection).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from sae.code import SparseCode, code_from_mask
from sae.errors import SAEError
from sae.kernels import RowEntries, batch_topk, batch_topk_entries, topk_rows
from sae.registry import TrainingRule, register_rule
from sae.rules.base import SparsityRule
from sae.rules.topk import TopKConfig, expected_density

if TYPE_CHECKING:
    from sae.config import TrainConfig

#: The inference threshold is the plain mean of the per-batch estimates over this last
#: fraction of the run's steps (at least one step); before that, an EMA of them.
CALIBRATION_FRACTION = 0.05

#: The default share of a run's first steps trained as per-token TopK (see the module's docstring).
TOPK_START_FRACTION = 0.25


def calibration_start(steps: int | None) -> int | None:
    """The first step of a run of `steps` steps whose estimate enters the final mean (None:
    no run length known, the EMA throughout)."""
    if steps is None:
        return None
    return max(0, steps - max(1, math.ceil(CALIBRATION_FRACTION * steps)))


@torch.no_grad()
def update_threshold(theta: torch.Tensor, updates: torch.Tensor, estimate: torch.Tensor, step: int,
                     calibrate_from: int | None, decay: float) -> None:
    """Move the threshold(s) theta toward this step's estimate (same shape, or broadcast):
    before calibrate_from an EMA with `decay` (the first update sets it), from calibrate_from
    on the running plain mean of the estimates of steps calibrate_from..step. Entries whose
    estimate is not finite (a batch that kept nothing) stay. On the device: no host read."""
    found = torch.isfinite(estimate)
    value = estimate.clamp(min=0).to(theta.dtype)
    if calibrate_from is not None and step >= calibrate_from:
        new = theta + (value - theta) / (step - calibrate_from + 1)
    else:
        new = torch.where(updates == 0, value, theta * decay + (1 - decay) * value)
    theta.copy_(torch.where(found, new, theta))
    updates += found.long()


class MutualChoiceRule(SparsityRule):
    """Batch-level top k*B with a calibrated inference threshold (a buffer: checkpointed)."""

    name = "mutual-choice"
    saelens_architecture = "jumprelu"
    scale_free_selection = True
    fused_graph = True

    def __init__(self, k: int, theta_decay: float = 0.99, row_cap_factor: int = 8, steps: int | None = None,
                 topk_start: float = TOPK_START_FRACTION) -> None:
        """steps: the run's length, which places the threshold's calibration window and the
        TopK start's end (None: the EMA throughout, no TopK start); topk_start: the share of
        the steps trained as per-token TopK."""
        super().__init__()
        self.k = int(k)
        self.topk_until = int(topk_start * steps) if steps is not None else 0
        #: steps this rule has trained (theta_updates on the host, read once per run or resume)
        self._steps_seen: int | None = None
        self.row_cap = self.k * int(row_cap_factor)
        self.theta_decay = float(theta_decay)
        self.calibrate_from = calibration_start(steps)
        self.register_buffer("theta", torch.zeros(()))
        self.register_buffer("theta_updates", torch.zeros((), dtype=torch.long))
        self._estimate: torch.Tensor | None = None  # the last step's smallest kept value (_record_estimate)

    def select(self, z: torch.Tensor) -> SparseCode:
        """Exact batch top-k*B. Fast path: sae.kernels.batch_topk cuts each row to its
        row_cap (8k) largest candidates first, and the code is trimmed to the widest row
        actually kept; if any row may hold more of the batch's winners than row_cap (its
        overflow count), the selection is redone exactly over the whole matrix. One host
        read (the overflow and the widest row together); nothing after batch_topk is dense."""
        z = z.detach()
        if self.training and self._in_topk_start():
            values, indices = topk_rows(z, min(self.k, z.shape[1]))
            self._record_estimate(values)
            return SparseCode(indices=indices, values=values)
        selected = batch_topk(z, self.k, cap=self.row_cap)
        kept = selected.values > 0
        overflow, widest = torch.stack([selected.overflow, kept.sum(dim=1).max()]).tolist()
        if overflow == 0:
            values, position = selected.values.topk(max(widest, 1), dim=1, sorted=False)
            code = SparseCode(indices=selected.indices.gather(1, position), values=values.to(z.dtype))
            smallest = selected.values
        else:
            acts = z.relu()
            budget = min(self.k * z.shape[0], acts.numel())
            kept_values, kept_flat = torch.topk(acts.reshape(-1), budget, sorted=False)
            keep = torch.zeros(acts.numel(), dtype=torch.bool, device=z.device).index_fill_(0, kept_flat, True)
            code = code_from_mask(acts, keep.view_as(acts))
            smallest = kept_values
        if self.training:
            self._record_estimate(smallest)
        return code

    def fused_select(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | RowEntries:
        """The training selection as sae.fused_step trains it, with select's threshold
        estimate: in the TopK start each row's k largest (values [B, k] float32, indices
        [B, k]: sae.kernels.triton_topk.row_topk), then the batch budget as RowEntries
        (sae.kernels.batch_topk_entries: k*B entries, no row padded to the widest). Nothing
        is read on the host, so a CUDA graph captures either (graph_key tells them apart)."""
        if self._in_topk_start():
            from sae.kernels.triton_topk import row_topk

            values, indices, _ = row_topk(z, min(self.k, z.shape[1]))
            self._record_estimate(values)
            return values, indices
        code = batch_topk_entries(z, self.k)
        self._record_estimate(code.values)
        return code

    def graph_key(self) -> bool:
        """Whether this step is in the TopK start: the two selections are two graphs."""
        return self._in_topk_start()

    def _record_estimate(self, kept: torch.Tensor) -> None:
        """This step's smallest positive kept value (inf: none), written into one tensor that
        after_step reads, so a CUDA graph's replay leaves it where after_step looks."""
        smallest = torch.where(kept > 0, kept, torch.inf).amin()
        if self._estimate is None or self._estimate.device != smallest.device:
            self._estimate = smallest.float()
        else:
            self._estimate.copy_(smallest)

    def _in_topk_start(self) -> bool:
        """Whether this training step is in the TopK start. Every step that keeps a value
        updates the threshold, so theta_updates counts the steps trained (checkpointed: a
        resumed run continues where it stopped); read from the device once, then counted."""
        if self.topk_until == 0:
            return False
        if self._steps_seen is None:
            self._steps_seen = int(self.theta_updates)
        return self._steps_seen < self.topk_until

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        """Loading new state (a resume) makes the step count be read again."""
        self._steps_seen = None
        super()._load_from_state_dict(*args, **kwargs)

    def after_step(self, model: nn.Module, step: int) -> None:
        """The threshold takes the estimate of the step just taken (update_threshold); every
        training step's selection records one."""
        if self._estimate is not None:
            update_threshold(self.theta, self.theta_updates, self._estimate, step, self.calibrate_from, self.theta_decay)
            if self._steps_seen is not None:
                self._steps_seen += 1

    def infer(self, z: torch.Tensor) -> SparseCode:
        return code_from_mask(z.relu(), z > self.theta)

    def saelens_tensors(self, d_sae: int) -> dict[str, torch.Tensor]:
        return {"threshold": self.theta.detach().expand(d_sae).clone()}


@dataclass
class BatchBudgetConfig(TopKConfig):
    """k, now the mean per token of the batch's budget, and theta's EMA decay (the settings
    Mutual Choice shares with Matryoshka BatchTopK)."""

    k: int | None = field(default=None, metadata={"help": "Mean active features per token (the batch keeps k * batch-size)."})
    theta_decay: float = field(default=0.99, metadata={"help": "EMA decay of the inference threshold before its final calibration."})

    def check(self, run: TrainConfig) -> None:
        super().check(run)
        if not 0 <= self.theta_decay <= 1:
            raise SAEError(f"`theta_decay={self.theta_decay}` must be between 0 and 1")


@dataclass
class MutualChoiceConfig(BatchBudgetConfig):
    """The batch budget's settings and the TopK start's share of the run."""

    topk_start: float = field(default=TOPK_START_FRACTION, metadata={
        "help": "Share of the run's first steps trained as per-token TopK before the batch budget."})

    def check(self, run: TrainConfig) -> None:
        super().check(run)
        if not 0 <= self.topk_start < 1:
            raise SAEError(f"`topk_start={self.topk_start}` must be at least 0 and under 1")


register_rule(TrainingRule(
    name="mutual-choice", config=MutualChoiceConfig, default_aux="aux-zipf", initial_density=expected_density,
    steps=("autograd", "fused"),
    build=lambda settings, run: MutualChoiceRule(settings.k, theta_decay=settings.theta_decay, steps=run.steps,
                                                 topk_start=settings.topk_start),
    short_run_settings={"k": 16},
))
