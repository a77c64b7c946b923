"""A TopK training step with the latents split over torchrun's ranks: SAEs wider than one GPU.

Rank r of W holds the features [r F, (r + 1) F), F = d_sae / W: its W_enc columns, b_enc,
W_dec rows and their Adam moments, plus a copy of b_dec (its Adam too, kept identical on
every rank by an identical gradient). Every rank reads the whole global batch x [B, d_in].
One step:
  1. z_r = (x - b_dec) W_enc_r + b_enc_r         this rank's block of pre-activations [B, F]
  2. each row's k largest of z_r                  candidates: values and global feature ids
  3. all-gather the candidates ([B, k] per rank); each row's k largest of the W k
     candidates is its global top-k (the global k largest are among the blocks' own)
  4. x_hat_r = sum of the kept entries this rank owns times its W_dec rows; x_hat =
     all-reduce(x_hat_r) + b_dec: the one-process reconstruction
  5. the loss (||x - x_hat||^2 over the batch's variance, as sae.autograd_step) and its
     gradient g = dL/dx_hat are computed on every rank alike; x_hat_r.backward(g) gives the
     shard's gradients, b_dec's through the encoder summed over ranks (an all-reduce of
     [d_in]) plus sum(g) through the output
  6. the decoder gradient's part along each unit row removed, Adam, rows renormalised,
     each on its own shard (sae.model.SparseAutoencoder's methods on the shard's model)
What crosses ranks is B W k candidates, one [B, d_in] all-reduce, [d_in] for b_dec and the
[d_sae] firing counts: nothing of the weights' size. The result is the one-process
TopK step up to the summation order of the all-reduced reconstruction.
The Trainer keeps the full SAE in host memory (its init, checkpoints and saved SAE are the
unsharded ones: weights_changed slices it into the shards, weights_to_model gathers them
back on every rank, optimizer_state the moments in the unsharded Adam layout); only the
shards and their moments live on the GPUs. Those gathers are collectives, so every rank
saves at the same steps (sae.step_choice requires `checkpoint_every`). TopK with aux
"none" only (AuxK's dead-feature top-k would need its own candidate exchange).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist

from sae.errors import SAEError
from sae.kernels.decode import sparse_decode
from sae.losses import batch_variance
from sae.model import SparseAutoencoder
from sae.rules import TopKRule
from sae.step import StepStats

#: The dimension of each parameter that runs over the features (None: replicated).
FEATURE_DIM = {"W_enc": 1, "b_enc": 0, "W_dec": 0, "b_dec": None}


class ShardedTopKStep:
    """A TrainStep (sae.step) training one rank's block of a TopK SAE's features (module doc)."""

    kind = "shard-latents"

    def __init__(self, model: SparseAutoencoder, lr: float, device: torch.device | str,
                 autocast_dtype: torch.dtype | None = None) -> None:
        """model: the full SAE in host memory, which the Trainer initialises, checkpoints and
        saves; device: where this rank's shard trains; autocast_dtype: the encoder product's
        (None: float32)."""
        if not dist.is_initialized():
            raise SAEError("call sae.distributed.init_process_group() before building a latent-sharded step")
        if not isinstance(model.rule, TopKRule) or model.tied or model.transcoder:
            raise SAEError('latent sharding trains TopK autoencoders only (`arch="topk"`)')
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if model.d_sae % self.world:
            raise SAEError(f"`d_sae={model.d_sae}` must divide evenly over {self.world} processes")
        self.width = model.d_sae // self.world
        if model.rule.k > self.width:
            raise SAEError(f"`k={model.rule.k}` is more than the {self.width} features of one rank's shard; use fewer processes")
        self.model, self.k, self.autocast_dtype = model, model.rule.k, autocast_dtype
        self.lo = self.rank * self.width
        self.shard = SparseAutoencoder(model.d_in, self.width, TopKRule(self.k)).to(device)
        self.on_cuda = self.shard.W_dec.device.type == "cuda"
        self.optimizer = torch.optim.Adam(list(self.shard.parameters()), lr=lr, fused=True if self.on_cuda else None)
        self.weights_changed()

    # ---- shards <-> the full SAE --------------------------------------------------------
    def _local(self, name: str, full: torch.Tensor) -> torch.Tensor:
        dim = FEATURE_DIM[name]
        return full if dim is None else full.narrow(dim, self.lo, self.width)

    def _gathered(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """The full tensor of a shard's `local` (every rank's, in feature order), on the CPU."""
        dim = FEATURE_DIM[name]
        if dim is None:
            return local.detach().cpu()
        rows = local.detach().movedim(dim, 0).contiguous()
        out = rows.new_empty((rows.shape[0] * self.world, *rows.shape[1:]))
        dist.all_gather_into_tensor(out, rows)
        return out.movedim(0, dim).cpu()

    @torch.no_grad()
    def weights_changed(self) -> None:
        """Copy this rank's block of the full SAE's weights into the shard."""
        for name, param in self.shard.named_parameters():
            param.copy_(self._local(name, getattr(self.model, name)))

    @torch.no_grad()
    def weights_to_model(self) -> None:
        """Gather every rank's shard into the full SAE (a collective: every rank calls it)."""
        for name, param in self.shard.named_parameters():
            getattr(self.model, name).copy_(self._gathered(name, param))

    def optimizer_state(self) -> dict[str, Any]:
        """The moments of every shard, gathered into torch Adam's layout for the full SAE (a collective)."""
        state = self.optimizer.state_dict()  # its entries are the optimizer's own: built anew, not edited
        names = [name for name, _ in self.shard.named_parameters()]
        full = {i: {"step": entry["step"].cpu(), **{key: self._gathered(names[i], entry[key]) for key in ("exp_avg", "exp_avg_sq")}}
                for i, entry in state["state"].items()}
        return {"state": full, "param_groups": state["param_groups"]}

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        """Take this rank's block of an unsharded Adam state (any step's checkpoint)."""
        names = [name for name, _ in self.shard.named_parameters()]
        local = {"param_groups": state["param_groups"], "state": {}}
        for i, entry in state["state"].items():
            local["state"][i] = {**entry, **{key: self._local(names[i], entry[key]).contiguous()
                                             for key in ("exp_avg", "exp_avg_sq")}}
        self.optimizer.load_state_dict(local)
        for group in self.optimizer.param_groups:
            group.update(fused=True if self.on_cuda else None)

    # ---- the step ---------------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def prepare_aux(self, aux_weights: torch.Tensor | None) -> None:
        """None: this step trains without an auxiliary loss (sae.step_choice refuses one)."""
        return None

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.shard.W_dec.device.type, dtype=self.autocast_dtype, cache_enabled=False)

    def _global_topk(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's k largest of the full pre-activations (values through ReLU, global ids),
        from every rank's own k largest of its block z [B, F]."""
        values, indices = z.detach().float().topk(self.k, dim=1, sorted=False)
        parts = []
        for local in (values, indices + self.lo):
            out = local.new_empty((self.world * len(local), self.k))
            dist.all_gather_into_tensor(out, local.contiguous())
            parts.append(out.view(self.world, len(local), self.k).permute(1, 0, 2).reshape(len(local), -1))
        top, at = parts[0].topk(self.k, dim=1, sorted=False)
        return top.relu(), parts[1].gather(1, at)

    def __call__(self, x: torch.Tensor, aux: None = None, target: torch.Tensor | None = None) -> StepStats:
        """One Adam step on the global batch x [B, d_in] (every rank passes the same one)."""
        if target is not None:
            raise SAEError('latent sharding trains autoencoders only; train a transcoder with `step="autograd"`')
        shard = self.shard
        with self._autocast():
            z = shard.pre_acts(x)
        top, ids = self._global_topk(z)
        mine = (ids >= self.lo) & (ids < self.lo + self.width) & (top > 0)
        local = torch.where(mine, ids - self.lo, 0)
        values = z.gather(1, local).float() * mine
        partial = sparse_decode(local, values, shard.W_dec)
        x_hat = partial.detach().clone()
        dist.all_reduce(x_hat)
        err = x_hat + shard.b_dec.detach() - x
        sq, variance = err.pow(2).sum(), batch_variance(x)
        self.optimizer.zero_grad(set_to_none=True)
        partial.backward(err * (2 / variance))
        through_encoder = dist.all_reduce(shard.b_dec.grad, async_op=True)
        fired_here = torch.zeros(self.width, device=x.device).index_add_(0, local.reshape(-1), mine.reshape(-1).float())
        fired = fired_here.new_empty(self.width * self.world)
        counted = dist.all_gather_into_tensor(fired, fired_here, async_op=True)
        shard.remove_parallel_decoder_grad()
        through_encoder.wait()
        shard.b_dec.grad.add_(err.sum(dim=0) * (2 / variance))
        self.optimizer.step()
        shard.normalize_decoder()
        counted.wait()
        return StepStats(sq_err=sq, loss=sq / variance, l0=(top > 0).sum().float(), fired=fired, aux=sq.new_zeros(()),
                         variance=variance, tokens=len(x))
