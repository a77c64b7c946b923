"""JumpReLU: f(z) = z * [z > threshold_j], one threshold per feature; inference and training.

Inference (JumpReLURule) is what a SAELens "jumprelu" folder computes, so any such folder
(ours from any rule that saves as it, or a peer's) loads into our evaluation; this module
registers that architecture (Mutual Choice, Matryoshka and GBA save as it too).

Training (JumpReLUTrainingRule, `arch="jumprelu"`) learns the thresholds as Rajamanoharan et
al. 2024 ("Jumping Ahead", arXiv 2407.14435) do, with Gemma Scope's recipe (Lieberum et al.
2024, arXiv 2408.05147):
- loss per token ||x - x_hat||^2 + lambda * L0, L0 = sum_j H(z_j - theta_j); here summed over
  the batch and divided by its variance like every rule's reconstruction error
  (SparsityRule.loss_term), so lambda keeps the paper's meaning on inputs scaled to unit
  mean squared norm (what the trainer does);
- straight-through estimators with a rectangle kernel K(u) = 1[|u| < 1/2] of bandwidth eps:
  d JumpReLU / d theta = -(theta / eps) K((z - theta) / eps) and d H / d theta =
  -(1 / eps) K((z - theta) / eps); the pre-activations get the plain derivatives (H(z -
  theta) through JumpReLU, none through the L0), as in the paper and SAELens's default;
- theta = exp(log_theta), the trained parameter; theta starts at 0.001 and eps = 0.001;
- lambda warms up linearly from 0 over the first 10,000 steps (a tenth of a shorter run).
SAELens differs in one place: it trains theta itself, clamped at 0, because Adam moves
log_theta by about lr a step, so from 0.001 the threshold needs many steps to reach the
pre-activations' scale. Here the paper's form is kept; a short run can start the thresholds
higher (jumprelu_init_threshold).

Sparse training path: the selection keeps the entries with z > theta - eps / 2, i.e. the
active ones and those just below their threshold, which are the only ones the estimators
give a gradient at; below-threshold entries enter the code with value 0, so they add nothing
to x_hat or the encoder's gradient. Nothing of size B x d_sae is kept for backward (on CUDA
the fused encoder drops z; the CPU's dense autograd path is the torch backend's own).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sae.code import SparseCode, code_from_mask
from sae.errors import SAEError
from sae.registry import Architecture, RuleConfig, TrainingRule, register_architecture, register_rule
from sae.rules.base import SparsityRule

if TYPE_CHECKING:
    from sae.config import TrainConfig

#: Gemma Scope's values: the starting threshold, the kernel bandwidth and lambda's warm-up.
INIT_THRESHOLD = 1e-3
BANDWIDTH = 1e-3
L0_WARMUP_STEPS = 10_000


def jumprelu(z: torch.Tensor, threshold: torch.Tensor) -> SparseCode:
    """The inference code: z where z > threshold (per feature), as SAELens computes it."""
    return code_from_mask(z.relu(), z > threshold)


class JumpReLURule(SparsityRule):
    """JumpReLU with fixed thresholds (a buffer): the inference form of a "jumprelu" folder."""

    name = "jumprelu"
    saelens_architecture = "jumprelu"

    def __init__(self, threshold: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("threshold", threshold.detach().clone())

    def infer(self, z: torch.Tensor) -> SparseCode:
        return jumprelu(z, self.threshold)

    def saelens_tensors(self, d_sae: int) -> dict[str, torch.Tensor]:
        return {"threshold": self.threshold.detach().clone()}


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """K(u) = 1[-1/2 < u < 1/2]."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _ThresholdSTE(torch.autograd.Function):
    """Forward: the code's values as they are (z * H(z - theta) at each entry). Backward:
    the values' gradient unchanged, and theta's pseudo-derivative -(theta / eps) K((z - theta)
    / eps) times it at each entry (pre: z at the entries, -inf at padding)."""

    @staticmethod
    def forward(ctx: Any, values: torch.Tensor, pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return values.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor, None]:
        pre, theta = ctx.saved_tensors
        window = rectangle((pre.float() - theta) / ctx.bandwidth)
        return grad, None, -(theta / ctx.bandwidth) * window * grad.float(), None


class _StepSTE(torch.autograd.Function):
    """Forward: H(z - theta) at each entry. Backward: theta's pseudo-derivative
    -(1 / eps) K((z - theta) / eps); none for z."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre.float() > theta).float()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        pre, theta = ctx.saved_tensors
        return None, -(1 / ctx.bandwidth) * rectangle((pre.float() - theta) / ctx.bandwidth) * grad, None


class JumpReLUTrainingRule(SparsityRule):
    """JumpReLU whose thresholds are trained (the log_threshold parameter) against an L0
    penalty whose coefficient warms up (the step count is a buffer: checkpointed)."""

    name = "jumprelu"
    saelens_architecture = "jumprelu"

    def __init__(self, d_sae: int, l0_coefficient: float, bandwidth: float = BANDWIDTH,
                 init_threshold: float = INIT_THRESHOLD, warmup_steps: int = L0_WARMUP_STEPS) -> None:
        super().__init__()
        self.l0_coefficient, self.bandwidth, self.warmup_steps = float(l0_coefficient), float(bandwidth), int(warmup_steps)
        self.log_threshold = nn.Parameter(torch.full((d_sae,), float(init_threshold)).log())
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        #: select's pre-activations at the code's entries, for train_code of the same pass
        self._pre: torch.Tensor | None = None
        #: train_code's H(z - theta) at the code's entries, for loss_term of the same pass
        self._step: torch.Tensor | None = None

    @property
    def threshold(self) -> torch.Tensor:
        """theta [d_sae] = exp(log_threshold)."""
        return self.log_threshold.exp()

    def coefficient(self) -> torch.Tensor:
        """lambda at this step: linear from lambda / warmup_steps up to lambda (a device scalar)."""
        if self.warmup_steps <= 0:
            return torch.tensor(self.l0_coefficient, device=self.steps_done.device)
        ramp = ((self.steps_done + 1).float() / self.warmup_steps).clamp(max=1.0)
        return self.l0_coefficient * ramp

    @torch.no_grad()
    def select(self, z: torch.Tensor) -> SparseCode:
        """The entries with z > theta - eps / 2; the ones at or below theta get value 0."""
        theta = self.threshold.detach()
        near = z > theta - self.bandwidth / 2
        code = code_from_mask(z, near)
        present = torch.arange(code.width, device=z.device) < near.sum(dim=1, keepdim=True)
        pre = torch.where(present, z.gather(1, code.indices), torch.full((), -torch.inf, dtype=z.dtype, device=z.device))
        self._pre = pre
        values = torch.where(pre > theta[code.indices], pre, torch.zeros((), dtype=z.dtype, device=z.device))
        return SparseCode(indices=code.indices, values=values)

    def train_code(self, code: SparseCode) -> SparseCode:
        """Attach theta to the values (the JumpReLU estimator) and keep the L0's step terms."""
        pre, self._pre = self._pre, None
        if pre is None:
            raise SAEError("JumpReLU's train_code needs the pre-activations of its own select in the same pass")
        theta = self.threshold[code.indices]
        self._step = _StepSTE.apply(pre, theta, self.bandwidth)
        return SparseCode(indices=code.indices, values=_ThresholdSTE.apply(code.values, pre, theta, self.bandwidth))

    def loss_term(self, x: torch.Tensor, target: torch.Tensor, code: SparseCode, model: nn.Module) -> torch.Tensor:
        """lambda * the batch's summed L0 (its gradient reaches theta only)."""
        step, self._step = self._step, None
        return self.coefficient() * step.sum()

    def infer(self, z: torch.Tensor) -> SparseCode:
        return jumprelu(z, self.threshold.detach())

    def saelens_tensors(self, d_sae: int) -> dict[str, torch.Tensor]:
        return {"threshold": self.threshold.detach().clone()}

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        self.steps_done += 1


@dataclass
class JumpReLUConfig(RuleConfig):
    """The trained JumpReLU's settings (Gemma Scope's defaults)."""

    jumprelu_l0_coefficient: float = field(default=0.01, metadata={
        "help": "lambda, the L0 penalty's weight against the squared error of inputs scaled to unit mean squared "
                "norm (the papers sweep it for the L0 they want; the default is ours)."})
    jumprelu_bandwidth: float = field(default=BANDWIDTH, metadata={
        "help": "Bandwidth eps of the rectangle kernel behind the thresholds' gradient."})
    jumprelu_init_threshold: float = field(default=INIT_THRESHOLD, metadata={"help": "Every threshold's starting value."})
    jumprelu_warmup_steps: int | None = field(default=None, metadata={
        "help": f"Steps over which lambda rises linearly from 0 (default: {L0_WARMUP_STEPS:,}, or a tenth of a shorter run)."})

    def check(self, run: TrainConfig) -> None:
        if not self.jumprelu_l0_coefficient >= 0:
            raise SAEError(f"`jumprelu_l0_coefficient={self.jumprelu_l0_coefficient}` must be 0 or more")
        if not self.jumprelu_bandwidth > 0:
            raise SAEError(f"`jumprelu_bandwidth={self.jumprelu_bandwidth}` must be positive")
        if not self.jumprelu_init_threshold > 0:
            raise SAEError(f"`jumprelu_init_threshold={self.jumprelu_init_threshold}` must be positive (the threshold is trained as its log)")
        if self.jumprelu_warmup_steps is None:
            self.jumprelu_warmup_steps = min(L0_WARMUP_STEPS, run.steps // 10)
        if self.jumprelu_warmup_steps < 0:
            raise SAEError(f"`jumprelu_warmup_steps={self.jumprelu_warmup_steps}` must be 0 or more")


def build_jumprelu(settings: JumpReLUConfig, run: TrainConfig) -> JumpReLUTrainingRule:
    return JumpReLUTrainingRule(run.d_sae, settings.jumprelu_l0_coefficient, bandwidth=settings.jumprelu_bandwidth,
                                init_threshold=settings.jumprelu_init_threshold, warmup_steps=settings.jumprelu_warmup_steps)


register_rule(TrainingRule(
    name="jumprelu", config=JumpReLUConfig, build=build_jumprelu, default_aux="none",
    # a threshold near 0 passes about half of the pre-activations at the start
    initial_density=lambda rule, run: 0.5,
    short_run_settings={"jumprelu_init_threshold": 0.1},
))
register_architecture(Architecture(name="jumprelu", load=lambda cfg, weights: JumpReLURule(weights["threshold"]),
                                   tensors=("threshold",)))
