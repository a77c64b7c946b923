"""The autograd training step: every rule, with torch's Adam.

One step: the training forward pass (bf16 encoder product under autocast when asked),
loss = (||y - x_hat||^2 + the rule's own term) / sum ||y - mean(y)||^2 (the FVU with the
global batch's variance; y is the target batch of a transcoder, x itself for an autoencoder;
the term is SparsityRule.loss_term, e.g. JumpReLU's L0 penalty)
+ aux_alpha * the auxiliary loss on the aux entries the rule's pass selected, backward,
the decoder gradient's part along each unit row removed, Adam (torch's fused kernel on
CUDA), decoder rows renormalised. shard, forward, loss_scale and reduce are the places a
data-parallel step differs from one process (sae.distributed.DataParallelStep).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from sae.code import SparseCode
from sae.losses import aux_candidates, aux_reconstruction_loss, batch_variance
from sae.model import SparseAutoencoder
from sae.step import StepStats


class AutogradStep:
    """A TrainStep (sae.step) through autograd and torch.optim.Adam."""

    kind = "autograd"

    def __init__(self, model: SparseAutoencoder, lr: float, *, autocast_dtype: torch.dtype | None = None, aux_k: int = 0,
                 aux_alpha: float = 0.0, capturable: bool = False) -> None:
        """autocast_dtype: the encoder product's autocast dtype (None: no autocast); aux_k,
        aux_alpha: the auxiliary loss's entries per token and weight; capturable: Adam
        keeps lr and its step count on the device, so sae.graph_step can capture the step."""
        self.model, self.autocast_dtype, self.aux_k, self.aux_alpha = model, autocast_dtype, aux_k, aux_alpha
        device = model.W_dec.device
        self.on_cuda = device.type == "cuda"
        self._lr = torch.tensor(float(lr), device=device) if capturable else lr
        # fused Adam (one kernel over all parameters) on CUDA; the CPU keeps torch's default
        self.optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=self._lr,
                                          fused=True if self.on_cuda else None, capturable=capturable)

    # The places DataParallelStep overrides (identity / one process here).
    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This process's part of the global batch."""
        return x

    def forward(self, x: torch.Tensor, select_aux: Any) -> tuple[torch.Tensor, SparseCode, SparseCode | None]:
        """The training forward pass (x_hat, code, aux_code)."""
        return self.model(x, select_aux)

    @property
    def loss_scale(self) -> int:
        """Multiplies this process's summed squared error in the loss (1 here; the world
        size under DDP, whose gradient mean would otherwise divide it)."""
        return 1

    def reduce(self, stats: torch.Tensor) -> torch.Tensor:
        """Sum a float vector of batch statistics over processes (nothing to do here)."""
        return stats

    # ---- the TrainStep interface ----------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is not None:
            return torch.autocast(self.model.W_dec.device.type, dtype=self.autocast_dtype, cache_enabled=False)
        return contextlib.nullcontext()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)
            elif group["lr"] != lr:
                group["lr"] = lr

    def prepare_aux(self, aux_weights: torch.Tensor | None) -> torch.Tensor | None:
        """The weights themselves: this step reads them in its pass."""
        return aux_weights

    def __call__(self, x_all: torch.Tensor, aux: torch.Tensor | None = None, target: torch.Tensor | None = None) -> StepStats:
        model = self.model
        x = self.shard(x_all)
        y_all = x_all if target is None else target
        y = x if target is None else self.shard(target)
        model.train()
        weights = aux
        select_aux = None if weights is None else (lambda z: aux_candidates(z, weights, self.aux_k))
        with self._autocast():
            x_hat, code, aux_code = self.forward(x, select_aux)
        variance = batch_variance(y_all)
        sq = (y - x_hat).pow(2).sum()
        term = model.rule.loss_term(x, y, code, model)
        objective = sq if term is None else sq + term
        scale = self.loss_scale
        main = (objective * scale if scale != 1 else objective) / variance
        if aux_code is not None and weights is not None:
            aux_loss = aux_reconstruction_loss(aux_code, (y - x_hat).detach(), weights, model.decode_directions)
        else:
            aux_loss = main.new_zeros(())
        loss = main + self.aux_alpha * aux_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        model.remove_parallel_decoder_grad()
        self.optimizer.step()
        model.normalize_decoder()
        with torch.no_grad():
            local = torch.cat([code.fired(model.d_sae).float(), sq.detach().reshape(1),
                               code.l0().sum().float().reshape(1), loss.detach().reshape(1)])
            stats = self.reduce(local)
        return StepStats(sq_err=stats[-3], loss=stats[-1], l0=stats[-2], fired=stats[:-3], aux=aux_loss.detach(),
                         variance=variance, tokens=len(x_all))

    def optimizer_state(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)
        defaults = self.optimizer.defaults
        on_device = defaults["fused"] or defaults["capturable"]
        for group in self.optimizer.param_groups:  # the state may come from another device or step
            group.update(lr=self._lr, fused=defaults["fused"], capturable=defaults["capturable"])
            for p in group["params"]:
                st = self.optimizer.state.get(p, {})
                if "step" in st and torch.is_tensor(st["step"]):
                    st["step"] = st["step"].to(p.device if on_device else "cpu", torch.float32)

    def weights_changed(self) -> None:
        """Nothing to refresh: the step reads the model's parameters themselves."""

    def weights_to_model(self) -> None:
        """Nothing to copy: the step trains the model's parameters themselves."""
