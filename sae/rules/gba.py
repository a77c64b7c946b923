"""GBA, Group Bias Adaptation (Chen et al. 2025, "Taming Polysemanticity in LLMs",
arXiv 2506.14002; docs/methods.md says what comes from the paper and what we chose).

No sparsity penalty and no top-k: the loss is reconstruction only, and sparsity is held by
per-neuron biases that get no gradient and are set by a feedback rule:

- the d_sae neurons are split at random into G groups; group g has a target activation
  frequency (TAF) p_g, spaced geometrically from the highest (HTF) down to the lowest (LTF);
- every T steps, over the pre-activations of those T steps, each neuron m has a firing
  frequency q_m and a peak r_m (its largest positive pre-activation, bias included);
- if q_m > p_g:      b_m <- max(b_m - gamma * r_m, -1)
  elif q_m < eps:    b_m <- min(b_m + gamma * rbar_g, 0), rbar_g the mean peak of the
  group's neurons that fired, so biases stay in [-1, 0] (units of the normalised input).

A TAF is a ceiling: the rule lowers a bias only while its neuron fires more often than its
target and raises it only once the neuron is silent, so L0 tends to d_sae * mean(p_g) from
below. With the paper's fixed ladder (0.1 down to 1e-3) that is 0.025 * d_sae at every width;
here the ladder is set from d_sae instead (default_targets): the paper's span (HTF/LTF = 100,
10 groups) with HTF = min(0.1, L0_SCALE / d_sae), so the paper's ladder is kept exactly up
to d_sae = 1280 and wider SAEs keep an L0 ceiling near 0.25 * L0_SCALE = 32. The update period
holds the paper's 50 steps of 512 tokens, or more where the lowest target would fire fewer
than FIRES_PER_BUFFER times in it (default_buffer_tokens).

Biases start at the target: on its first training batch each neuron's threshold is set so
that it fires on a fraction p_g of that batch (clipped to the bias range), so the code is as
sparse as the targets from the first step (a zero start fires half of d_sae).

The rest follows the paper's LLM runs:
- tied weights: f(x) = sum_m a_m w_m phi(w_m . (x - b_pre) + b_m) + b_pre. Here the encoder
  is the unit direction of each decoder row and the row's norm is a_m
  (SparseAutoencoder.tied), so the bias range [-1, 0] keeps its meaning while training;
- phi is JumpReLU: the bias gates a neuron but does not shrink its value. We hold it as
  threshold = -b in [0, 1] with b_enc fixed at 0, f(u) = u * [u > threshold], which is
  SAELens's "jumprelu" architecture (saved with this threshold);
- only w and a get gradients: b_pre (our b_dec) stays at its data initialisation, the
  geometric median. Trained by the reconstruction loss it drifted to twice the data's
  norm, and neurons aligned with -b_dec then fired on every token whatever their bias.
Registers the training rule "gba" (autograd and fused steps, one process; saved as SAELens "jumprelu").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from sae.code import SparseCode, code_from_mask
from sae.errors import SAEError
from sae.kernels import RowEntries, mask_entries
from sae.registry import RuleConfig, TrainingRule, register_rule
from sae.rules.base import SparsityRule

if TYPE_CHECKING:
    from sae.config import TrainConfig

#: The paper's ladder: its groups, its highest target and its span (HTF / LTF).
GROUPS = 10
PAPER_HTF = 0.1
LADDER_SPAN = 100.0
#: HTF is at most this over d_sae: the L0 every neuron would give at the top target.
L0_SCALE = 128
#: The paper's update period: 50 steps of 512 tokens.
PAPER_BUFFER_TOKENS = 50 * 512
#: Expected firings of a lowest-target neuron in one update's buffer, at least: fewer and
#: a neuron at its target is often seen silent, and the rule would raise its bias.
FIRES_PER_BUFFER = 10


def default_targets(d_sae: int) -> tuple[float, float]:
    """(HTF, LTF) for a width: the paper's top target, lowered to L0_SCALE / d_sae for wide
    SAEs, with the paper's span below it (an HTF given alone gets the same span)."""
    p_max = min(PAPER_HTF, L0_SCALE / d_sae)
    return p_max, p_max / LADDER_SPAN


def default_buffer_tokens(p_min: float) -> int:
    """Tokens behind one bias update: the paper's buffer, or enough for the lowest target."""
    return max(PAPER_BUFFER_TOKENS, math.ceil(FIRES_PER_BUFFER / p_min))


def geometric_targets(groups: int, p_max: float, p_min: float) -> torch.Tensor:
    """G target frequencies from p_max down to p_min, equally spaced in log."""
    if groups == 1:
        return torch.tensor([p_max])
    exps = torch.linspace(math.log(p_max), math.log(p_min), groups, dtype=torch.float64)
    return exps.exp().float()


class GBARule(SparsityRule):
    """JumpReLU whose per-neuron thresholds follow the group bias feedback; the statistics
    buffers are checkpointed with the model."""

    name = "gba"
    saelens_architecture = "jumprelu"
    trains_encoder_bias = False
    trains_decoder_bias = False
    tied_weights = True

    def __init__(
        self,
        d_sae: int,
        groups: int = GROUPS,
        p_max: float | None = None,
        p_min: float | None = None,
        every: int = 50,
        gamma: float = 0.01,
        eps: float = 1e-6,
        seed: int = 0,
    ) -> None:
        super().__init__()
        p_max = default_targets(d_sae)[0] if p_max is None else p_max
        p_min = p_max / LADDER_SPAN if p_min is None else p_min
        self.groups, self.every, self.gamma, self.eps = int(groups), int(every), float(gamma), float(eps)
        generator = torch.Generator().manual_seed(seed)
        group = torch.randperm(d_sae, generator=generator) % self.groups
        self.register_buffer("group", group)
        self.register_buffer("group_target", geometric_targets(self.groups, p_max, p_min))
        self.register_buffer("threshold", torch.zeros(d_sae))
        self.register_buffer("fire_count", torch.zeros(d_sae))
        self.register_buffer("peak", torch.zeros(d_sae))
        self.register_buffer("buffer_tokens", torch.zeros((), dtype=torch.long))
        #: whether the thresholds were set from a first batch (start_at_targets)
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))
        self._started = False  # host copy of `started`, so a step reads the device flag once

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001 - torch's hook
        """A checkpoint saved before `started` existed holds thresholds already adapted:
        it resumes as started."""
        state_dict.setdefault(prefix + "started", torch.ones((), dtype=torch.bool))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def target(self) -> torch.Tensor:
        """Per-neuron target frequency, [d_sae]."""
        return self.group_target[self.group]

    @property
    def bias(self) -> torch.Tensor:
        """The paper's b_m, in [-1, 0]."""
        return -self.threshold

    @torch.no_grad()
    def start_at_targets(self, z: torch.Tensor) -> None:
        """Thresholds at which each neuron fires on a fraction p_g of this batch (its
        floor(p_g * B) + 1-th largest pre-activation), clipped to the bias range."""
        z = z.float()
        rows = z.shape[0]
        for g, p in enumerate(self.group_target.tolist()):
            members = (self.group == g).nonzero().squeeze(1)
            kth = min(int(p * rows), rows - 1) + 1
            self.threshold[members] = z[:, members].topk(kth, dim=0).values[-1]
        self.threshold.clamp_(0.0, 1.0)
        self.started.fill_(True)

    @torch.no_grad()
    def select(self, z: torch.Tensor) -> SparseCode:
        """JumpReLU, and in training mode buffer each neuron's firing count and peak. Both
        come from the code: a neuron fires exactly where it is kept, and its peak margin
        max(z - threshold, 0) is over its kept entries (0 if none), so z is read only once.
        The first training batch first sets the thresholds (start_at_targets)."""
        self._start(z)
        code = self.infer(z)
        if self.training:
            self._record(code.indices, code.values, z.shape[0])
        return code

    @torch.no_grad()
    def fused_select(self, z: torch.Tensor) -> RowEntries:
        """select's code and statistics as sae.fused_step trains it: the entries z > threshold
        in row order (sae.kernels.mask_entries), no row padded to the widest."""
        self._start(z)
        code = mask_entries(z, z > self.threshold)
        self._record(code.indices, code.values, z.shape[0])
        return code

    def _start(self, z: torch.Tensor) -> None:
        """On the first training batch, set the thresholds from it (start_at_targets)."""
        if self.training and not self._started:
            if not bool(self.started):
                self.start_at_targets(z)
            self._started = True

    def _record(self, indices: torch.Tensor, values: torch.Tensor, tokens: int) -> None:
        """Add a training code's firings (its positive entries) and peak margins to the buffer."""
        active = values > 0
        self.fire_count.index_add_(0, indices.reshape(-1), active.reshape(-1).to(self.fire_count.dtype))
        margin = (values - self.threshold[indices]).clamp(min=0).to(self.peak.dtype)
        self.peak.scatter_reduce_(0, indices.reshape(-1), margin.reshape(-1), reduce="amax")
        self.buffer_tokens += tokens

    def infer(self, z: torch.Tensor) -> SparseCode:
        return code_from_mask(z, z > self.threshold)

    def saelens_tensors(self, d_sae: int) -> dict[str, torch.Tensor]:
        return {"threshold": self.threshold.detach().clone()}

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        if (step + 1) % self.every == 0:
            self.adapt()

    @torch.no_grad()
    def adapt(self) -> None:
        """Apply the bias rule from the buffered statistics, then empty the buffer."""
        q = self.fire_count / self.buffer_tokens.clamp(min=1)
        r = self.peak
        alive = (r > 0).float()
        group_peak = torch.zeros(self.groups, device=r.device).index_add_(0, self.group, r)
        group_peak /= torch.zeros(self.groups, device=r.device).index_add_(0, self.group, alive).clamp(min=1)
        over = q > self.target
        under = (q < self.eps) & ~over
        bias = self.bias
        lowered = (bias - self.gamma * r).clamp(min=-1.0)
        raised = (bias + self.gamma * group_peak[self.group]).clamp(max=0.0)
        self.threshold.copy_(-torch.where(over, lowered, torch.where(under, raised, bias)))
        self.fire_count.zero_()
        self.peak.zero_()
        self.buffer_tokens.zero_()


@dataclass
class GBAConfig(RuleConfig):
    """GBARule's settings as a run gives them; None: set from d_sae and the batch (default_targets,
    default_buffer_tokens)."""

    gba_groups: int = field(default=GROUPS, metadata={"help": "Neuron groups."})
    gba_p_max: float | None = field(default=None, metadata={
        "help": f"Highest group target frequency (default: min({PAPER_HTF}, {L0_SCALE} / d_sae))."})
    gba_p_min: float | None = field(default=None, metadata={
        "help": f"Lowest group target frequency (default: the highest / {LADDER_SPAN:g})."})
    gba_every: int | None = field(default=None, metadata={
        "help": f"Steps between bias updates (default: every {PAPER_BUFFER_TOKENS:,} tokens, the paper's 50 steps "
                f"of 512, or {FIRES_PER_BUFFER} / the lowest target if more)."})
    gba_gamma: float = field(default=0.01, metadata={"help": "Bias step size."})
    gba_eps: float = field(default=1e-6, metadata={"help": "Firing frequency under which a neuron's bias is raised."})

    def check(self, run: TrainConfig) -> None:
        if self.gba_groups <= 0:
            raise SAEError(f"`gba_groups={self.gba_groups}` must be a positive number of groups")
        if self.gba_p_max is None:
            self.gba_p_max = default_targets(run.d_sae)[0]
        if self.gba_p_min is None:
            self.gba_p_min = self.gba_p_max / LADDER_SPAN
        if not 0 < self.gba_p_min <= self.gba_p_max <= 1:
            raise SAEError("GBA targets need 0 < `gba_p_min` <= `gba_p_max` <= 1")
        if self.gba_every is None:
            self.gba_every = max(1, round(default_buffer_tokens(self.gba_p_min) / run.batch_size))
        if self.gba_every <= 0:
            raise SAEError(f"`gba_every={self.gba_every}` must be a positive number of steps")


def build_gba(settings: GBAConfig, run: TrainConfig) -> GBARule:
    return GBARule(
        run.d_sae, groups=settings.gba_groups, p_max=settings.gba_p_max, p_min=settings.gba_p_min,
        every=settings.gba_every, gamma=settings.gba_gamma, eps=settings.gba_eps, seed=run.seed,
    )


register_rule(TrainingRule(
    name="gba", config=GBAConfig, build=build_gba, default_aux="none", steps=("autograd", "fused"),
    initial_density=lambda rule, run: float(rule.target.mean()),
))
