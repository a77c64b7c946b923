"""One TopK, Mutual Choice or GBA training step as a handful of kernels, with no autograd.

The step sae.autograd_step runs for TopK (MSE / batch variance, the decoder gradient's part
along each unit row removed, Adam, decoder rows renormalised), computed as:
  0. xc = x - b_dec and the batch variance sae.kernels.triton_centre (one read of x)
  1. z = xc @ W_enc + b_enc               one dense product (bf16, or fp32)
  2. the rule's fused_select               TopK: the k largest of each row,
                                           sae.kernels.triton_topk.row_topk (split guess +
                                           verify); Mutual Choice: the batch's k*B largest
                                           as flat entries in row order (RowEntries); GBA:
                                           z > threshold as RowEntries (mask_entries)
  3. x_hat, grad_out, grad_val, sq_err     sae.kernels.triton_decode_residual (one gather of
                                           the decoder's bf16 copy in bf16; for entries,
                                           each row walks its own)
  4. pairs sorted by feature, db_enc       torch.sort; chunk_sums over the runs of pair_chunk
                                           pairs inside one feature; per-feature sums
  5. b_dec's gradient                      sum of grad_out (on a second stream, beside step 4)
                                           - W_enc db_enc (before W_enc moves; the encoder's
                                           bf16 copy, as the product read it)
  6. dW_enc, dW_dec and Adam on both       sae.kernels.triton_feature_adam, one program per
     rows + b_enc, renorm, bf16 copies    feature: no weight-sized gradient tensor
  7. Adam on b_dec                         one launch (vector_adam)
Tied weights (GBA: one matrix, the encoder its unit rows) replace step 6 with
sae.kernels.triton_tied_adam, which adds both gradient parts into the one row, and train
no biases (b_enc is 0, the thresholds are the rule's buffers; b_dec stays put).
With an auxiliary loss (a call with aux: prepare_aux's capacity of features, those of largest
aux weight w, the ones of weight 0 padding), as sae.autograd_step computes it: each row's
k_aux largest z among the features of w > 0 activate as w * ReLU(z) and reconstruct the
residual e = x - x_hat (step 3 writes e); AuxK's weights are 1 on the dead features,
aux_zipf's the Zipf deficits. One such feature takes up to a whole batch of these entries,
so they are not pairs for step 6 but dense products over their columns only (_aux: the
encoder product's dtype, torch matmuls), whose rows step 6 adds to those features' sums
(each row's k_aux largest by torch.topk, which beats the Triton select at k_aux in the
hundreds: bench/kernels_aux_topk.py); b_dec gets none of the aux reconstruction's
gradient directly (it has no b_dec), only through the encoder, like the main entries.
torch's path, for comparison, makes dense gradient tensors and walks the weights in four
more passes (the parallel-part removal, Adam, the renormalisation, the bf16 cast).
The step shares storage with the model it trains, which must hold W_enc feature-major
(SparseAutoencoder.make_encoder_feature_major), so the model is current after every step.
lr and the step count live on the device and no stage reads the host (the aux capacity is
chosen before the step, sae.aux_capacity), so sae.graph_step.CudaGraphStep captures the
step: one graph per batch shape, aux capacity and rule.graph_key (Mutual Choice's TopK
start and batch budget; GBA's selection reads its count on the host and runs eagerly:
SparsityRule.fused_graph). Checkpoints carry the moments in torch.optim.Adam's state_dict layout and float32
(bf16 moments convert both ways exactly), so the autograd step resumes them and back.
Triton only: backend "triton" (on CUDA, or on CPU under TRITON_INTERPRET=1 for tests).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from sae.aux_capacity import AUX_COLUMNS, AuxCapacity
from sae.errors import SAEError
from sae.kernels import RowEntries, topk_rows
from sae.kernels.backend import resolve_backend
from sae.losses import batch_variance
from sae.model import SparseAutoencoder
from sae.registry import rule_names, training_rule
from sae.step import StepStats


def aux_columns(z: torch.Tensor, features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """z's columns of the aux features [B, N], in one gather: the n features' own, then
    columns up to N, the next multiple of AUX_COLUMNS; the padding and every feature of
    weight 0 read -inf, which no top-k of a row takes before a candidate's column."""
    n = features.numel()
    pad = -(-n // AUX_COLUMNS) * AUX_COLUMNS - n
    columns = z.index_select(1, torch.nn.functional.pad(features, (0, pad)))
    return columns.masked_fill_(torch.nn.functional.pad(weights, (0, pad)) <= 0, -torch.inf)


def exclude_code(z_aux: torch.Tensor, column: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                 rows: torch.Tensor | None) -> None:
    """Set z_aux [B, N] (aux_columns) to -inf, in place, at the main code's active entries
    whose feature is an aux column (column [d_sae]: a feature's aux column, -1 for none):
    the entries SparseCode.outside removes in the autograd step. The code is rows of
    (values, indices) [B, w], or flat entries with their rows (RowEntries). Adding -inf
    there and 0 elsewhere writes every entry once per mention, so repeated (row, feature)
    pairs need no care and the step stays capturable (no host read)."""
    col = column[indices]
    hit = (col >= 0) & (values > 0)
    row = torch.arange(len(z_aux), device=z_aux.device).unsqueeze(1) if rows is None else rows.long()
    flat = row * z_aux.shape[1] + col.clamp(min=0)
    add = torch.zeros(hit.shape, dtype=z_aux.dtype, device=z_aux.device).masked_fill_(hit, -torch.inf)
    z_aux.view(-1).index_add_(0, flat.reshape(-1), add.reshape(-1))


class FusedTopKStep:
    """A TrainStep (sae.step) that trains a TopK SparseAutoencoder in place with
    Adam(betas, eps), no weight decay."""

    kind = "fused"

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
        moments_dtype: torch.dtype = torch.float32,
        pair_chunk: int = 32,
        backend: str | None = None,
    ) -> None:
        """precision: the encoder product's dtype ("bf16" or "fp32"), and the decoder
        copy's that the decode gathers (float32 rows stay the master); grad_out_dtype: how
        the reconstruction gradient is stored for the decoder's per-feature sums (bf16
        halves what they gather; the sums stay float32); k_aux, aux_alpha: the aux loss's entries
        per token and its weight in the loss, for a call with `aux`; moments_dtype:
        the weight matrices' Adam moments (bfloat16: stochastic rounding, 2/3 of the
        optimizer's memory traffic); pair_chunk: runs of this many pairs
        inside one feature are summed in parallel before step 6 (0: every feature's program
        walks all its pairs). The default, 32, came out fastest in a whole-step sweep
        (bench/gpu_train.py) and bounds the serial walk where one feature fires on half the
        batch (bench/kernels_feature_adam.py). backend: sae.kernels.backend.resolve_backend's
        (None: by the model's device); it must come out "triton"."""
        if "fused" not in training_rule(model.rule.name).steps:
            fused = ", ".join(name for name in rule_names() if "fused" in training_rule(name).steps)
            raise SAEError(f"the fused step trains {fused} SAEs only (`model`); other rules train through sae.autograd_step")
        device = model.W_dec.device
        if resolve_backend(device, backend) != "triton":
            raise SAEError('the fused step runs Triton kernels: pass a CUDA `model`, or `backend="triton"` on CPU '
                           "under TRITON_INTERPRET=1")
        if precision not in ("bf16", "fp32"):
            raise SAEError(f"`precision` must be bf16 or fp32, not {precision!r}")
        if (not model.tied and not model.W_enc.t().is_contiguous()) or not model.W_dec.is_contiguous():
            raise SAEError("the fused step needs `model` with W_enc feature-major and W_dec contiguous: "
                           "call model.make_encoder_feature_major() first")
        self.model, self.betas, self.eps = model, betas, eps
        self.grad_out_dtype, self.pair_chunk = grad_out_dtype, pair_chunk
        self.k_aux, self.aux_alpha = min(k_aux, model.d_sae), aux_alpha
        W_dec = model.W_dec.data
        lp_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        dec_lp = W_dec.to(torch.bfloat16) if precision == "bf16" else W_dec
        if model.tied:  # one matrix: the encoder's operand is a copy of its unit rows (tied_feature_adam)
            self.params = {"W_dec": W_dec, "b_enc": model.b_enc.data, "W_dec_lp": dec_lp,
                           "W_enc_lp": torch.nn.functional.normalize(W_dec, dim=1).to(lp_dtype)}
        else:
            W_enc_t = model.W_enc.data.t()
            self.params = {"W_enc_t": W_enc_t, "W_dec": W_dec, "b_enc": model.b_enc.data, "W_dec_lp": dec_lp,
                           "W_enc_lp": W_enc_t.to(lp_dtype) if precision == "bf16" else W_enc_t}
        self.moments = {}
        for name in ("W_dec",) if model.tied else ("W_enc_t", "W_dec", "b_enc"):
            dtype = moments_dtype if self.params[name].dim() == 2 else torch.float32
            self.moments[name] = tuple(torch.zeros_like(self.params[name], dtype=dtype) for _ in range(2))
        self.b_dec = model.b_dec.data
        self.b_dec_moments = (torch.zeros_like(self.b_dec), torch.zeros_like(self.b_dec))
        self.lr = torch.full((1,), float(lr), device=device)
        self._host_lr = float(lr)  # what a checkpoint records, read without a sync
        self.step_count = torch.zeros(1, device=device)
        self._side = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._aux_capacity = AuxCapacity(model.d_sae)

    def _beside(self) -> contextlib.AbstractContextManager:
        """Run the block on a second stream, after what the current one has issued (on CUDA;
        a CUDA graph captures both as parallel branches). _join() before using its results."""
        if self._side is None:
            return contextlib.nullcontext()
        self._side.wait_stream(torch.cuda.current_stream())
        return torch.cuda.stream(self._side)

    def _join(self) -> None:
        if self._side is not None:
            torch.cuda.current_stream().wait_stream(self._side)

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor a step writes (weights, moments, step count): what a checkpoint or a
        graph's warm-up must save and restore, in place."""
        moments = [t for pair in (*self.moments.values(), self.b_dec_moments) for t in pair]
        return [*self.params.values(), self.b_dec, *moments, self.step_count]

    def weights_changed(self) -> None:
        """Refresh the low-precision copies step reads, after the model's weights were
        written from outside it (initialised, loaded from a checkpoint)."""
        p = self.params
        if self.model.tied:
            p["W_enc_lp"].copy_(torch.nn.functional.normalize(p["W_dec"], dim=1))
        for lp, master in (("W_enc_lp", "W_enc_t"), ("W_dec_lp", "W_dec")):
            if master in p and p[lp].data_ptr() != p[master].data_ptr():
                p[lp].copy_(p[master])

    def weights_to_model(self) -> None:
        """Nothing to copy: the step trains the model's storage in place."""

    def set_lr(self, lr: float) -> None:
        """A device write, no sync: safe between graph replays."""
        self.lr.fill_(float(lr))
        self._host_lr = float(lr)

    def prepare_aux(self, aux_weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(ids [N], weights [N]) of the N features of largest aux weight, ids ascending, N
        the step's capacity (sae.aux_capacity: the features of weight 0 among them are
        padding), or None when the count of weights > 0 last read is 0. No host sync, and N
        changes seldom, so a CUDA graph per N replays the step with its aux."""
        if aux_weights is None:
            return None
        columns = self._aux_capacity(aux_weights)
        if columns == 0:
            return None
        weights, ids = aux_weights.topk(columns, sorted=False)
        ids, order = ids.sort()
        return ids, weights[order]

    def select(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | RowEntries:
        """What the rule keeps of z [B, d_sae] (its fused_select): (values float32 [B, w],
        indices [B, w]), such as TopK's k largest of each row, or RowEntries (Mutual
        Choice's batch budget)."""
        return self.model.rule.fused_select(z)

    # ---- the places sae.fused_data_parallel.FusedDataParallelStep splits over processes -------
    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """The rows of the global batch this process encodes and decodes (all of them here)."""
        return x

    def gather_rows(self, *parts: torch.Tensor) -> Callable[[], list[torch.Tensor]]:
        """Start gathering per-row tensors of the shard into the global batch's; the returned
        call waits for them (here: the tensors themselves, at once)."""
        return lambda: list(parts)

    # ---- checkpoints: the moments in torch.optim.Adam's state_dict layout --------------------
    def _adam_moments(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(exp_avg, exp_avg_sq) of each trained parameter, in model.parameters() order and
        shaped like it: views of the step's tensors (W_enc's are transposes)."""
        model, moments = self.model, self.moments
        of = {id(model.W_dec): moments["W_dec"], id(model.b_dec): self.b_dec_moments}
        if not model.tied:
            of.update({id(model.W_enc): (moments["W_enc_t"][0].t(), moments["W_enc_t"][1].t()), id(model.b_enc): moments["b_enc"]})
        return [of[id(p)] for p in model.parameters() if p.requires_grad]

    def optimizer_state(self) -> dict[str, Any]:
        step = self.step_count.reshape(())
        moments = self._adam_moments()
        state = {i: {"step": step.clone(), "exp_avg": m.contiguous().float(), "exp_avg_sq": v.contiguous().float()}
                 for i, (m, v) in enumerate(moments)}
        group = {"lr": self._host_lr, "betas": self.betas, "eps": self.eps, "weight_decay": 0, "params": list(range(len(moments)))}
        return {"state": state, "param_groups": [group]}

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        for i, (m, v) in enumerate(self._adam_moments()):
            saved = state["state"].get(i)
            if saved:  # none before the first step
                m.copy_(saved["exp_avg"])
                v.copy_(saved["exp_avg_sq"])
                self.step_count.copy_(saved["step"].reshape(1))

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, aux: tuple[torch.Tensor, torch.Tensor] | None = None,
                 target: torch.Tensor | None = None) -> StepStats:
        """One Adam step on the batch x [B, d_in] (float32, contiguous). aux: the features the
        auxiliary loss reaches this step and their weights (prepare_aux; non-empty, needs
        k_aux > 0); None: no auxiliary loss. target: must be None (this step trains
        autoencoders; transcoders train through the autograd step)."""
        if target is not None:
            raise SAEError('the fused step trains autoencoders only; train a transcoder with `step="autograd"`')
        aux_features, aux_weights = (None, None) if aux is None else aux
        from sae.kernels.triton_centre import centre
        from sae.kernels.triton_decode_residual import decode_residual, decode_residual_entries
        from sae.kernels.triton_feature_adam import chunk_sums, feature_adam, feature_sums, sort_pairs, vector_adam
        from sae.kernels.triton_tied_adam import tied_feature_adam

        p = self.params
        self.step_count += 1
        lp = p["W_enc_lp"].dtype
        xc, variance, scale = centre(x, self.b_dec, lp)
        own = self.shard(x)
        z = torch.addmm(p["b_enc"].to(lp), self.shard(xc), p["W_enc_lp"].t())
        code = self.select(z)
        z_aux = column = None
        if aux_features is not None:
            z_aux = aux_columns(z, aux_features, aux_weights)
            column = torch.full((z.shape[1],), -1, device=z.device, dtype=torch.long)
            column[aux_features] = torch.arange(aux_features.numel(), device=z.device)
            exclude_code(z_aux, column, *((code.values, code.indices, code.rows) if isinstance(code, RowEntries) else (*code, None)))
        del z
        residual = None if aux_features is None else torch.empty_like(own)
        decoded = dict(grad_out_dtype=self.grad_out_dtype, residual=residual)
        if isinstance(code, RowEntries):  # rows of any width: one process (no rule of them is data parallel)
            values, indices, rows = code.values, code.indices, code.rows
            grad_out, grad_val, sq_err = decode_residual_entries(code, p["W_dec_lp"], self.b_dec, own, scale, **decoded)
        else:
            (values, indices), rows = code, None
            codes = self.gather_rows(values, indices, *(() if z_aux is None else (z_aux,)))
            grad_out, grad_val, sq_err = decode_residual(indices, values, p["W_dec_lp"], self.b_dec, own, scale, **decoded)
            grads = self.gather_rows(grad_out, grad_val, sq_err, *(() if residual is None else (residual,)))
            values, indices, *aux_rows = codes()
            grad_out, grad_val, sq_err, *residual_rows = grads()
            z_aux, residual = (aux_rows[0], residual_rows[0]) if aux_features is not None else (None, None)
        with self._beside():  # small reductions, in parallel with the pairs' sort and sums
            sq = sq_err.sum()
            loss, aux, aux_grads = sq * scale[0], sq.new_zeros(()), None
            db_dec_out = grad_out.sum(dim=0, dtype=torch.float32)  # b_dec's gradient through x_hat
        pairs = sort_pairs(indices, values, grad_val, p["W_dec"].shape[0], rows=rows)
        chunks = chunk_sums(pairs, grad_out, xc, self.pair_chunk) if self.pair_chunk else None
        trains_b_dec, tied = self.model.b_dec.requires_grad, self.model.tied
        db_enc = feature_sums(pairs, chunks) if trains_b_dec or not tied else None  # b_enc's and b_dec's
        self._join()
        if aux_features is not None:
            if self.k_aux <= 0 or aux_features.numel() == 0 or tied:
                raise SAEError("the auxiliary loss needs `k_aux` > 0, a feature in `aux` and untied weights")
            aux, aux_grads = self._aux(z_aux, aux_features, aux_weights, column, residual, xc, db_enc)
            loss = loss + self.aux_alpha * aux
        # b_dec's gradient through the encoder, before W_enc moves, through the copy the
        # product read (in bf16: half the bytes, db_enc rounded to bf16 too)
        db_dec_enc = db_enc.to(lp) @ p["W_enc_lp"] if trains_b_dec else None
        if tied:
            fired = tied_feature_adam(pairs, grad_out, xc, p, self.moments["W_dec"], self.lr, self.step_count,
                                      self.betas, self.eps, chunks=chunks)
        else:
            fired = feature_adam(pairs, grad_out, xc, p, self.moments, db_enc,
                                 self.lr, self.step_count, self.betas, self.eps, aux=aux_grads, chunks=chunks)
        if trains_b_dec:
            vector_adam(self.b_dec, self.b_dec_moments, db_dec_out, db_dec_enc, self.lr, self.step_count, self.betas, self.eps)
        return StepStats(sq_err=sq, loss=loss, l0=fired.sum(), fired=fired, aux=aux, variance=variance[0], tokens=len(x))

    def _aux(
        self, z_aux: torch.Tensor, features: torch.Tensor, weights: torch.Tensor, column: torch.Tensor,
        residual: torch.Tensor, xc: torch.Tensor, db_enc: torch.Tensor,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """sae.losses.aux_reconstruction_loss on z_aux [B, N] (aux_columns: the n aux features'
        columns of z, then -inf columns up to N; the main code's entries -inf: exclude_code),
        weights w [n], column [F] each feature's aux column (-1: none): per row the k_aux largest (all n
        when fewer; torch.topk through sae.kernels.topk_rows) activate as a = w * ReLU(z) and reconstruct
        e = residual; loss ||a W_aux - e||^2 / ||e - mean(e)||^2. Its gradient, scaled by
        aux_alpha, as dense products over the N columns, whose aligned strides the fast GEMM
        kernels need: adds the b_enc part to db_enc in place and returns (loss, (row, dW_dec,
        dW_enc)) for feature_adam's aux. z_aux's storage becomes the activations, then the
        pre-activations' gradient: a kept entry's value is overwritten by its gradient and
        every other entry stays 0."""
        n, N = features.numel(), z_aux.shape[1]
        W_aux = self.params["W_dec_lp"].index_select(0, torch.nn.functional.pad(features, (0, N - n))).to(z_aux.dtype)
        W_aux[n:] = 0
        w = torch.nn.functional.pad(weights.float(), (0, N - n))
        top, local = topk_rows(z_aux, min(self.k_aux, n), backend="torch")  # at k_aux in the hundreds torch.topk is the faster
        kept_w = w[local]
        acts_kept = top * kept_w
        acts = z_aux.zero_().scatter_(1, local, acts_kept.to(z_aux.dtype))
        err = (acts @ W_aux).float() - residual
        e_var = batch_variance(residual)
        loss = err.pow(2).sum() / e_var
        grad_e_hat = ((2 * self.aux_alpha / e_var) * err).to(acts.dtype)
        dW_dec = (acts.t() @ grad_e_hat)[:n]
        grad_kept = torch.where(acts_kept > 0, (grad_e_hat @ W_aux.t()).gather(1, local).float() * kept_w, 0.0)
        grad_z = acts.scatter_(1, local, grad_kept.to(acts.dtype))
        db_enc.index_add_(0, features, torch.zeros(N, device=db_enc.device).scatter_add_(0, local.reshape(-1), grad_kept.reshape(-1))[:n])
        return loss, (column.to(torch.int32), dW_dec, (grad_z.t() @ xc)[:n])

