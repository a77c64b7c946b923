"""One TopK training step as a handful of kernels, with no autograd and no host sync.

The step sae.trainer runs for TopK (MSE / batch variance, the decoder gradient's part
along each unit row removed, Adam, decoder rows renormalised), computed as:
  1. z = (x - b_dec) @ W_enc + b_enc      one dense product (bf16, or fp32)
  2. the k largest of each row             sae.kernels.triton_topk.row_topk (split guess + verify)
  3. x_hat, grad_out, grad_val, sq_err     sae.kernels.triton_decode_residual (one gather)
  4. pairs sorted by feature, db_enc       torch.sort, then per-feature sums
  5. b_dec's gradient                      sum of grad_out - W_enc db_enc (before W_enc moves)
  6. dW_enc, dW_dec and Adam on both       sae.kernels.triton_feature_adam, one program per
     rows + b_enc, renorm, bf16 copy      feature: no weight-sized gradient tensor
  7. Adam on b_dec                         a few torch ops on d_in numbers
With AuxK (step(x, dead=...)), as sae.trainer computes it through autograd: step 2 also
takes each row's k_aux largest z among the dead features (torch.topk, live ones at -inf),
step 3 writes the residual e = x - x_hat, a second decode_residual reconstructs e from
those entries (its loss gradient in a second block of grad_out), and their pairs join
steps 4-6; only the main grad_out reaches b_dec directly (e carries no gradient, the
reconstruction has no b_dec), the aux pairs reach it through the encoder like the main ones.
torch's path, for comparison, makes dense gradient tensors and walks the weights in four
more passes (the parallel-part removal, Adam, the renormalisation, the bf16 cast).
The step shares storage with the model it trains: W_enc becomes the transpose view of a
feature-major [d_sae, d_in] tensor, so the model is current after every step. lr and the
step count live on the device, so a CUDA graph can capture step().
Triton only: on CUDA, or on CPU under TRITON_INTERPRET=1 with force_triton (tests).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sae.kernels.backend import use_triton
from sae.losses import batch_variance
from sae.model import SparseAutoencoder
from sae.rules import TopKRule


class StepStats(NamedTuple):
    """Device tensors of one step (reading one is a host sync)."""

    sq_err: torch.Tensor  # sum over the batch of ||x - x_hat||^2
    loss: torch.Tensor  # sq_err / variance (the FVU) + aux_alpha * aux: what the step descended
    l0: torch.Tensor  # sum over the batch of the number of positive activations
    fired: torch.Tensor  # [d_sae] positive activations per feature
    aux: torch.Tensor  # the AuxK loss (0 without it)


class FusedTopKStep:
    """Trains a TopK SparseAutoencoder in place with Adam(betas, eps), no weight decay."""

    def __init__(
        self,
        model: SparseAutoencoder,
        lr: float,
        precision: str = "bf16",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        grad_out_dtype: torch.dtype = torch.float32,
        k_aux: int = 0,
        aux_alpha: float = 1 / 32,
        force_triton: bool | None = None,
    ) -> None:
        """precision: the encoder product's dtype ("bf16" or "fp32"); grad_out_dtype: how
        the reconstruction gradient is stored for the decoder's per-feature sums (bf16
        halves what they gather; the sums stay float32); k_aux, aux_alpha: AuxK's entries
        per token and its weight in the loss, for step(x, dead=...)."""
        if not isinstance(model.rule, TopKRule) or model.tied:
            raise ValueError("FusedTopKStep trains TopK SAEs only; other rules train through sae.trainer")
        device = model.W_dec.device
        if not use_triton(device, force_triton):
            raise ValueError("FusedTopKStep runs Triton kernels: use a CUDA model (or TRITON_INTERPRET=1 and force_triton)")
        if precision not in ("bf16", "fp32"):
            raise ValueError(f"precision must be bf16 or fp32, not {precision!r}")
        self.model, self.k, self.betas, self.eps = model, model.rule.k, betas, eps
        self.grad_out_dtype = grad_out_dtype
        self.k_aux, self.aux_alpha = min(k_aux, model.d_sae), aux_alpha
        with torch.no_grad():
            W_enc_t = model.W_enc.detach().t().contiguous()
            model.W_enc.data = W_enc_t.t()
            model.W_dec.data = model.W_dec.data.contiguous()
        lp = W_enc_t.to(torch.bfloat16) if precision == "bf16" else W_enc_t
        self.params = {"W_enc_t": W_enc_t, "W_dec": model.W_dec.data, "b_enc": model.b_enc.data, "W_enc_lp": lp}
        self.moments = {name: (torch.zeros_like(t), torch.zeros_like(t)) for name, t in self.params.items() if name != "W_enc_lp"}
        self.b_dec = model.b_dec.data
        self.b_dec_moments = (torch.zeros_like(self.b_dec), torch.zeros_like(self.b_dec))
        self.lr = torch.full((1,), float(lr), device=device)
        self.step_count = torch.zeros(1, device=device)
        self._no_bias = torch.zeros_like(self.b_dec)  # the AuxK reconstruction has no b_dec

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor step() writes (weights, moments, step count): what a checkpoint or a
        graph's warm-up must save and restore, in place."""
        moments = [t for pair in (*self.moments.values(), self.b_dec_moments) for t in pair]
        return [*self.params.values(), self.b_dec, *moments, self.step_count]

    def reload_weights(self) -> None:
        """Call after the model's weights were written from outside step() (initialised,
        loaded from a checkpoint): refreshes the low-precision encoder copy step() reads."""
        lp = self.params["W_enc_lp"]
        if lp.data_ptr() != self.params["W_enc_t"].data_ptr():
            lp.copy_(self.params["W_enc_t"])

    def set_lr(self, lr: float) -> None:
        """A device write, no sync: safe between graph replays."""
        self.lr.fill_(float(lr))

    @torch.no_grad()
    def step(self, x: torch.Tensor, variance: torch.Tensor | None = None, dead: torch.Tensor | None = None) -> StepStats:
        """One Adam step on the batch x [B, d_in] (float32). variance: the batch's
        sum ||x - mean||^2 (a device scalar; computed from x when None). dead: bool [d_sae],
        the features AuxK may revive this step (needs k_aux > 0); None: no AuxK."""
        from sae.kernels.triton_decode_residual import decode_residual
        from sae.kernels.triton_feature_adam import feature_adam, feature_sums
        from sae.kernels.triton_scatter import sort_pairs_by_feature
        from sae.kernels.triton_topk import row_topk

        p = self.params
        self.step_count += 1
        if variance is None:
            variance = (x - x.mean(dim=0)).pow(2).sum()
        scale = 1.0 / variance.clamp(min=1e-12).reshape(1)
        lp = p["W_enc_lp"].dtype
        xc = (x - self.b_dec).to(lp)
        z = torch.addmm(p["b_enc"].to(lp), xc, p["W_enc_lp"].t())
        values, indices, _ = row_topk(z, self.k)
        if dead is not None:  # AuxK's candidates (z is not needed after this)
            assert self.k_aux > 0, "AuxK needs k_aux > 0"
            aux_z, aux_indices = z.masked_fill_(~dead, -torch.inf).topk(self.k_aux, dim=1, sorted=False)
        del z
        B = x.shape[0]
        grad_out = torch.empty((B if dead is None else 2 * B), x.shape[1], device=x.device, dtype=self.grad_out_dtype)
        residual = None if dead is None else torch.empty_like(x)
        _, grad_val, sq_err = decode_residual(indices, values, p["W_dec"], self.b_dec, x, scale, out=grad_out[:B], residual=residual)
        sq = sq_err.sum()
        loss, aux, keys = sq * scale[0], sq.new_zeros(()), indices
        db_dec = grad_out[:B].sum(dim=0, dtype=torch.float32)
        if dead is not None:
            aux, aux_values, aux_grad_val = self._auxk(aux_z, aux_indices, dead, residual, grad_out[B:])
            loss = loss + self.aux_alpha * aux
            # entries with no value (below 0, or at -inf: fewer dead features than k_aux) add
            # nothing; the key d_sae puts them past every feature's slice of the sorted pairs
            keys = torch.cat([indices, torch.where(aux_values > 0, aux_indices, p["W_dec"].shape[0])], dim=1)
            values = torch.cat([values, aux_values], dim=1)
            grad_val = torch.cat([grad_val, aux_grad_val], dim=1)
        order, offsets = sort_pairs_by_feature(keys, p["W_dec"].shape[0])
        db_enc = feature_sums(order, offsets, grad_val)
        db_dec -= db_enc @ p["W_enc_t"]
        fired = feature_adam(order, offsets, values, grad_val, grad_out, xc, p, self.moments, db_enc,
                             self.lr, self.step_count, self.betas, self.eps, k_main=self.k)
        if self.model.b_dec.requires_grad:
            self._adam_b_dec(db_dec)
        return StepStats(sq_err=sq, loss=loss, l0=(values[:, : self.k] > 0).sum(), fired=fired, aux=aux)

    def _auxk(
        self, aux_z: torch.Tensor, aux_indices: torch.Tensor, dead: torch.Tensor, residual: torch.Tensor, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """sae.losses.aux_reconstruction_loss for the entries (aux_indices, ReLU(aux_z)):
        ||sum_j a_j W_dec[i_j] - e||^2 / ||e - mean(e)||^2, 0 when no feature is dead (as
        on the autograd path, which then has no entries). Fills grad_out with the gradient
        of aux_alpha * loss with respect to the reconstruction; returns (loss, the entries'
        values a_j, their gradients grad_val)."""
        from sae.kernels.triton_decode_residual import decode_residual

        values = aux_z.float().relu()
        e_var = batch_variance(residual)
        scale = (self.aux_alpha / e_var).reshape(1)
        _, grad_val, sq_err = decode_residual(aux_indices, values, self.params["W_dec"], self._no_bias, residual, scale, out=grad_out)
        loss = torch.where(dead.any(), sq_err.sum() / e_var, 0.0)
        return loss, values, grad_val

    def _adam_b_dec(self, g: torch.Tensor) -> None:
        (beta1, beta2), (m, v) = self.betas, self.b_dec_moments
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = self.lr / (1 - torch.pow(beta1, self.step_count))
        denom = v.sqrt() / torch.sqrt(1 - torch.pow(beta2, self.step_count)) + self.eps
        self.b_dec.sub_(step_size * m / denom)
