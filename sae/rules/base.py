"""What every sparsifying rule provides: a training selection, a batch-free inference form,
and how it is written in the SAELens format.

z = (x - b_dec) W_enc + b_enc are the pre-activations [B, d_sae]. A rule turns them into a
SparseCode. The rules differ only here; the decoder, losses, trainer and IO are shared.
Selection runs inside the fused encoder (sae.kernels.sparse_encode) on a z that carries no
gradient: a rule returns which entries to keep and their activations, and the encoder's
backward sends the gradient through those kept entries only.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch
from torch import nn

from sae.code import SparseCode
from sae.kernels import RowEntries


class SparsityRule(nn.Module):
    """Base class. State the rule learns (thresholds, GBA statistics) lives in buffers, so it
    travels with the model's state_dict into checkpoints."""

    name: str = ""
    #: SAELens architecture the inference form is saved as ("topk", "jumprelu", "standard").
    saelens_architecture: str = ""
    #: False where b_enc is set by a feedback rule instead of gradients (GBA).
    trains_encoder_bias: bool = True
    #: False where b_dec stays at its data initialisation (GBA; see sae/rules/gba.py).
    trains_decoder_bias: bool = True
    #: True where the encoder is the decoder's directions (GBA; see SparseAutoencoder.tied).
    tied_weights: bool = False

    #: True where multiplying every pre-activation by one c > 0 keeps the same entries (top-k
    #: selections; not thresholds): SparseAutoencoder.fit_encoder_scale then sets the
    #: encoder's starting scale.
    scale_free_selection: bool = False
    #: Whether the fused step of this rule (sae.fused_step) can be replayed as CUDA graphs
    #: (sae.graph_step): its fused_select reads nothing on the host, and is the same at every
    #: step of one graph_key.
    fused_graph: bool = False

    def fused_select(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | RowEntries:
        """The training selection sae.fused_step trains, for a rule registered with the fused
        step: (values [B, w] float32, indices [B, w]) or sae.kernels.RowEntries."""
        raise NotImplementedError

    def graph_key(self) -> Hashable:
        """Which of the rule's fused selections this step runs (sae.graph_step captures one
        graph per key): the same for every step here."""
        return None

    def select(self, z: torch.Tensor) -> SparseCode:
        """Training-time selection on a detached z (may use the whole batch; in training mode
        it may update rule state). Values are the activation at the kept entries, 0 = padding."""
        return self.infer(z)

    def forward(self, z: torch.Tensor) -> SparseCode:
        return self.select(z)

    def infer(self, z: torch.Tensor) -> SparseCode:
        """Inference selection: each row on its own, as the saved SAELens SAE computes it."""
        raise NotImplementedError

    def saelens_config(self) -> dict[str, Any]:
        """Extra cfg.json fields for the SAELens architecture (e.g. {"k": 32})."""
        return {}

    def saelens_tensors(self, d_sae: int) -> dict[str, torch.Tensor]:
        """Extra weight tensors for the SAELens file (e.g. {"threshold": ...})."""
        return {}

    def train_code(self, code: SparseCode) -> SparseCode:
        """The training code as the decoder receives it (here: unchanged). A rule with
        parameters of its own attaches them to the graph here (trained JumpReLU's thresholds,
        through a straight-through estimator on the code's values)."""
        return code

    def loss_term(self, x: torch.Tensor, target: torch.Tensor, code: SparseCode, model: nn.Module) -> torch.Tensor | None:
        """A loss term of the rule's own for this training batch x (its code from train_code)
        and the step's target (x itself for an autoencoder, the other hook's batch for a
        transcoder), in the units of the batch's summed squared error: the step adds it to
        that error before dividing by the batch's variance. None: the rule adds nothing."""
        return None

    def after_step(self, model: nn.Module, step: int) -> None:
        """Hook called after each optimiser step (GBA adapts its biases here)."""
