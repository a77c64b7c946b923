"""Matryoshka BatchTopK (Bussmann, Nabeshima, Karvonen and Nanda 2025, "Learning Multi-Level
Features with Matryoshka Sparse Autoencoders", arXiv 2503.17547).

Nested prefixes of the dictionary, features [0, m_1) within [0, m_2) ... within [0, d_sae),
each reconstruct the input on their own: x_hat_m = sum over active features j < m of
a_j W_dec[j] + b_dec, and the loss is the sum over levels of ||x - x_hat_m||^2 (the paper's
equation and SAELens's; the whole dictionary is the last level, which is the step's own
reconstruction error, so SparsityRule.loss_term adds the inner levels). Early features are
used by every level, so they learn the general directions and later ones the specific
ones, which keeps a general feature from being absorbed into its specialisations. A
transcoder's levels predict its target the same way (with a skip transcoder's linear term).

Selection is BatchTopK over the whole dictionary, the Mutual Choice rule of this package
(sae.rules.mutual_choice: the k*B largest entries of the batch, and for inference the EMA
of the smallest kept value as a JumpReLU threshold, which is the papers' calibration with
rate 0.01). Saved as SAELens "jumprelu" with that threshold, as SAELens saves its own
Matryoshka BatchTopK SAEs for inference.

Default levels: the paper's Gemma runs, groups of d_sae/16, d_sae/16, d_sae/8, d_sae/4 and
d_sae/2, i.e. prefixes d_sae/16, d_sae/8, d_sae/4, d_sae/2 and d_sae.
Registers the training rule "matryoshka" (autograd step, one process; AuxK by default as
in the paper).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from sae.code import SparseCode
from sae.errors import SAEError
from sae.registry import TrainingRule, register_rule
from sae.rules.mutual_choice import BatchBudgetConfig, MutualChoiceRule
from sae.rules.topk import expected_density

if TYPE_CHECKING:
    from sae.config import TrainConfig

#: The paper's prefixes as fractions of d_sae.
PAPER_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1)


def default_widths(d_sae: int) -> tuple[int, ...]:
    """The paper's prefixes for a width, rounded and without repeats (a narrow SAE has fewer)."""
    widths = sorted({max(1, round(d_sae * f)) for f in PAPER_FRACTIONS})
    return tuple(widths)


def parse_widths(text: str, d_sae: int) -> tuple[int, ...]:
    """The prefix widths "64,128,512" names: ascending integers ending at d_sae."""
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError as err:
        raise SAEError(f"`matryoshka_widths=\"{text}\"` must be comma-separated integers, e.g. \"64,128,{d_sae}\"") from err
    if not widths or widths[-1] != d_sae or any(a >= b for a, b in zip(widths, widths[1:])) or widths[0] <= 0:
        raise SAEError(f"`matryoshka_widths=\"{text}\"` must be increasing positive widths ending at d_sae={d_sae}")
    return widths


class MatryoshkaRule(MutualChoiceRule):
    """BatchTopK with the nested prefix reconstruction losses."""

    name = "matryoshka"

    def __init__(self, k: int, widths: tuple[int, ...], theta_decay: float = 0.99, steps: int | None = None) -> None:
        """steps: the run's length, which places the inference threshold's calibration over
        its last steps (as Mutual Choice's); the batch budget from the first step (no TopK
        start: the paper's BatchTopK)."""
        super().__init__(k, theta_decay=theta_decay, steps=steps, topk_start=0.0)
        self.widths = tuple(int(w) for w in widths)

    def loss_term(self, x: torch.Tensor, target: torch.Tensor, code: SparseCode, model: nn.Module) -> torch.Tensor | None:
        """sum over the inner levels m of ||target - prediction_m||^2 over the batch; each
        level's prediction is the model's output from the code with the entries of features
        >= m zeroed (the same sparse decode; a skip transcoder's linear term included)."""
        total = None
        for width in self.widths[:-1]:
            inner = SparseCode(indices=code.indices, values=torch.where(code.indices < width, code.values, 0))
            error = (target - model.output(x, inner)).pow(2).sum()
            total = error if total is None else total + error
        return total


@dataclass
class MatryoshkaConfig(BatchBudgetConfig):
    """Mutual Choice's k and theta decay, and the prefix widths."""

    matryoshka_widths: str | None = field(default=None, metadata={
        "help": "Comma-separated prefix widths, increasing, ending at d_sae (default: the paper's d_sae/16, /8, /4, /2, d_sae)."})

    def check(self, run: TrainConfig) -> None:
        super().check(run)
        if self.matryoshka_widths is None:
            self.matryoshka_widths = ",".join(map(str, default_widths(run.d_sae)))
        elif isinstance(self.matryoshka_widths, (list, tuple)):
            self.matryoshka_widths = ",".join(map(str, self.matryoshka_widths))
        parse_widths(self.matryoshka_widths, run.d_sae)


register_rule(TrainingRule(
    name="matryoshka", config=MatryoshkaConfig, default_aux="auxk", initial_density=expected_density,
    build=lambda settings, run: MatryoshkaRule(settings.k, parse_widths(settings.matryoshka_widths, run.d_sae),
                                               theta_decay=settings.theta_decay, steps=run.steps),
    short_run_settings={"k": 16},
))
