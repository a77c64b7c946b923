"""The sparse autoencoder shared by every rule: z = (x - b_dec) W_enc + b_enc,
x_hat = f(z) W_dec + b_dec, with f a pluggable SparsityRule; and the transcoder, the same
model predicting a target at another hook: z = x W_enc + b_enc, y_hat = f(z) W_dec + b_dec
(+ x W_skip^T for a skip transcoder), W_dec [d_sae, d_out] (SAELens's Transcoder layout).

Shapes follow SAELens (W_enc [d_in, d_sae], W_dec [d_sae, d_in]) so saving is a rename,
not a transpose. On the triton backend (CUDA's default) training runs the encoder through
sae.kernels.sparse_encode: one dense product, the rule's selection on the result, and a
backward through the kept entries only (plus the auxiliary loss's entries, selected in the
same pass); on the torch backend the same selection feeds plain autograd. The decode step is a
gather-sum of the active rows of W_dec (sae.kernels.sparse_decode); when a rule keeps so
many features per row that gathering would cost more than a dense product (GBA early in
training), decode falls back to one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sae.code import SparseCode
from sae.errors import SAEError
from sae.kernels import sparse_decode, sparse_encode
from sae.kernels.backend import resolve_backend
from sae.rules.base import SparsityRule

#: Gather rows while the code is at most this fraction of d_sae wide; else one dense matmul.
#: On CUDA the gather's forward and backward grow with the width while one dense product's
#: stay flat; they cross near d_sae / 13 (bench/kernels_decode_crossover.py). On CPU the
#: gather's torch backward (index_add over B x w rows) loses to one BLAS product at a much
#: narrower code, hence the smaller fraction.
SPARSE_DECODE_MAX_FRACTION = {"cuda": 1 / 13, "cpu": 1 / 64}


class SparseAutoencoder(nn.Module):
    """Parameters W_enc, b_enc, W_dec, b_dec and a rule. Inputs are in the units the SAE
    was trained in (training normalises them; io folds that scale into the saved weights)."""

    def __init__(self, d_in: int, d_sae: int, rule: SparsityRule, d_out: int | None = None, skip: bool = False) -> None:
        """d_out: a transcoder's target width (None: an autoencoder, d_out = d_in); skip: a
        skip transcoder's linear term W_skip [d_out, d_in] (zero at the start)."""
        super().__init__()
        self.d_in, self.d_sae = int(d_in), int(d_sae)
        #: A transcoder predicts another hook's activations; its encoder takes x itself
        #: (b_dec lives in the output space, so nothing is subtracted from the input).
        self.transcoder = d_out is not None
        self.d_out = int(d_out) if d_out is not None else self.d_in
        if skip and not self.transcoder:
            raise SAEError("a skip connection needs a transcoder (a target width d_out)")
        self.rule = rule
        #: Tied weights (GBA, as in its paper): no W_enc parameter; the encoder is the unit
        #: direction of each decoder row, and the row's norm is the neuron's output scale.
        self.tied = rule.tied_weights
        if self.tied and self.transcoder:
            raise SAEError(f"rule {rule.name} ties its encoder to the decoder, which a transcoder's two spaces cannot share; "
                           "train the transcoder with another rule")
        self.W_enc = None if self.tied else nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae), requires_grad=rule.trains_encoder_bias)
        self.W_dec = nn.Parameter(torch.empty(d_sae, self.d_out))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out), requires_grad=rule.trains_decoder_bias)
        self.W_skip = nn.Parameter(torch.zeros(self.d_out, d_in)) if skip else None
        #: The kernels' backend (sae.kernels.backend.resolve_backend; None: by the input's
        #: device). "triton" trains through kernels.sparse_encode (backward over the kept
        #: entries only); "torch" through a dense autograd product, which on a CPU beats the
        #: scatter over B x (k + k_aux) pairs at the widths an SAE on a CPU has.
        self.backend: str | None = None

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator, b_dec: torch.Tensor | None = None) -> None:
        """Unit-norm random decoder rows, W_enc = W_dec^T, b_enc = 0, b_dec from data."""
        w = torch.randn(self.d_sae, self.d_out, generator=generator)
        self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        if self.transcoder:  # input and output spaces differ: unit random encoder columns of their own
            w = torch.randn(self.d_sae, self.d_in, generator=generator)
            self.W_enc.copy_((w / w.norm(dim=1, keepdim=True)).T)
        elif not self.tied:
            self.W_enc.copy_(self.W_dec.T)
        self.b_enc.zero_()
        if b_dec is not None:
            self.b_dec.copy_(b_dec)

    @torch.no_grad()
    def fit_encoder_scale(self, x: torch.Tensor, target: torch.Tensor | None = None) -> float:
        """Scale W_enc by the c that minimises ||(y - b_dec - skip) - c * decode_directions(code)||^2
        over the sample x (y: x for an autoencoder, a transcoder's target; skip: a skip
        transcoder's x W_skip^T), and return c. For a rule whose selection ignores a common
        scale of z (SparsityRule.scale_free_selection, with b_enc = 0 as init_weights leaves it)
        the code's values scale with W_enc, so c is one least-squares ratio. W_enc = W_dec^T at
        unit norm overshoots: the k rows most aligned with x each return their whole
        projection, so the k projections add up to more than x (FVU above 1 where k is a
        large fraction of d_in); the fitted, smaller encoder starts nearer the data and moves
        farther per Adam step relative to its size."""
        y = x if target is None else target
        along, sq = 0.0, 0.0
        for part, goal in zip(x.split(4096), y.split(4096)):  # bounds the dense pre-activations of a wide SAE
            code = self.rule.select(self.pre_acts(part))
            x_hat = self.decode_directions(code)
            offset = self.output(part, code) - x_hat  # b_dec, and a skip transcoder's linear term
            along += float(((goal - offset) * x_hat).sum())
            sq += float(x_hat.pow(2).sum())
        c = along / sq if sq > 0 else 0.0
        if c > 0:
            self.W_enc.mul_(c)
        return c

    def encoder_matrix(self) -> torch.Tensor:
        """W_enc [d_in, d_sae]: the parameter, or with tied weights the unit decoder
        directions (a feature-major view, the layout sae.kernels.sparse_encode prefers)."""
        if self.tied:
            return nn.functional.normalize(self.W_dec, dim=1).t()
        return self.W_enc

    def input_bias(self) -> torch.Tensor:
        """What the encoder subtracts from x: b_dec for an autoencoder, zeros for a transcoder."""
        return self.b_dec if not self.transcoder else self.b_enc.new_zeros(self.d_in)

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """z [B, d_sae]."""
        return (x - self.input_bias()) @ self.encoder_matrix() + self.b_enc

    def decode(self, code: SparseCode) -> torch.Tensor:
        """x_hat [B, d_out] from a sparse code (without a skip transcoder's x W_skip^T)."""
        return self.decode_directions(code) + self.b_dec

    def output(self, x: torch.Tensor, code: SparseCode) -> torch.Tensor:
        """The prediction from input x and its code: decode(code), plus x W_skip^T for a
        skip transcoder."""
        out = self.decode(code)
        if self.W_skip is not None:
            out = out + x.to(self.W_skip.dtype) @ self.W_skip.T
        return out

    def decode_directions(self, code: SparseCode) -> torch.Tensor:
        """sum_j a_j W_dec[i_j], without b_dec (what AuxK reconstructs the residual with).
        In W_dec's dtype (fp32): a bf16 autocast around training reaches the encoder product
        only, though the code's values come out of it in bf16."""
        fraction = SPARSE_DECODE_MAX_FRACTION["cuda" if self.W_dec.is_cuda else "cpu"]
        with torch.autocast(self.W_dec.device.type, enabled=False):
            if code.width > max(1, int(self.d_sae * fraction)):
                return code.to_dense(self.d_sae).to(self.W_dec.dtype) @ self.W_dec
            return sparse_decode(code.indices, code.values, self.W_dec, backend=self.backend)

    def forward(
        self, x: torch.Tensor, aux: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, SparseCode, SparseCode | None]:
        """Training pass: (x_hat, code, aux_code).

        aux(z) -> LongTensor[B, k_aux], if given, names extra entries per row (AuxK's dead
        features) from z with the row's own code at -inf (SparseCode.outside); they come back
        as aux_code with values ReLU(z) there (0 where a row had too few entries outside its
        code), carrying gradient to the encoder like the main code's, but they take no part
        in x_hat. The main code
        passes through the rule's train_code before it is decoded.
        """
        width = 0

        def select(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            nonlocal width
            code = self.rule.select(z)
            width = code.width
            if aux is None:
                return code.values, code.indices
            free = code.outside(z)
            extra = aux(free)
            values = torch.cat([code.values, free.gather(1, extra).relu().to(code.values.dtype)], dim=1)
            return values, torch.cat([code.indices, extra], dim=1)

        backend = resolve_backend(x.device, self.backend)
        if backend == "triton":
            values, indices = sparse_encode(x, self.encoder_matrix(), self.b_enc, self.input_bias(), select, backend=backend)
        else:
            z = self.pre_acts(x)
            kept, indices = select(z.detach())
            values = z.gather(1, indices) * (kept != 0)  # same contract: slope 1 where kept
        code = self.rule.train_code(SparseCode(indices=indices[:, :width], values=values[:, :width]))
        aux_code = SparseCode(indices=indices[:, width:], values=values[:, width:]) if aux is not None else None
        return self.output(x, code), code, aux_code

    def encode(self, x: torch.Tensor) -> SparseCode:
        """Inference code: the rule's batch-free form (what the saved SAE computes)."""
        return self.rule.infer(self.pre_acts(x))

    def feature_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Dense inference activations [B, d_sae] (compare with sae_lens SAE.encode)."""
        return self.encode(x).to_dense(self.d_sae)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Inference reconstruction (a transcoder's prediction) [B, d_out]."""
        return self.output(x, self.encode(x))

    @torch.no_grad()
    def make_encoder_feature_major(self) -> None:
        """Store W_enc as the transpose view of a contiguous [d_sae, d_in] tensor (same
        values, same Parameter): the layout whose feature rows the kernels read in one
        sweep (sae.fused_step needs it; sparse_encode's backward prefers it)."""
        if self.W_enc is not None and not self.W_enc.t().is_contiguous():
            self.W_enc.data = self.W_enc.detach().t().contiguous().t()

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Put every decoder row back on the unit sphere (after each optimiser step); tied
        weights keep each neuron's output scale in its row norm instead."""
        if self.tied:
            return
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp(min=1e-8))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Drop the part of dW_dec along each (unit) row, so the step moves along the sphere."""
        if self.W_dec.grad is None or self.tied:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
        self.W_dec.grad.sub_(parallel * self.W_dec)
