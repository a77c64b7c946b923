"""TopK training through sae.fused_step.FusedTopKStep: the Trainer around a step with no
autograd, and the choice between the two steps (`workbench train --step`).

FusedTopKTrainer changes only the step, for --arch topk with --aux none or auxk (on CUDA
`--step auto` picks it for both); aux-zipf and the other rules train through the
autograd step. The fit loop, the NaN/Inf guard, the dead-feature
counters and densities (Trainer.end_step), checkpoints and the saved SAE are the Trainer's.
The step's Adam moments and step count go into checkpoint.pt in torch.optim.Adam's layout
and float32 (self.optimizer carries them there and back, and takes no step itself; bf16
moments convert both ways exactly), so a resumed run
ends bit for bit where an uninterrupted one does, and either trainer resumes the other's
checkpoint.

The fused step applies Adam inside the kernel that sums each feature's gradient, so no
gradient tensor exists to all-reduce: data-parallel training (sae.distributed) keeps the
autograd step.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from sae.config import TrainConfig
from sae.data import ActivationSource
from sae.errors import SAEError
from sae.fused_step import FusedTopKStep, StepStats
from sae.registry import rule_names, training_rule
from sae.trainer import Trainer

#: `--step`: auto = fused where fused_unsupported() finds nothing and the device is CUDA.
STEPS = ("auto", "fused", "autograd")
#: Auxiliary losses the fused step computes.
FUSED_AUX = ("auxk", "none")

def fused_unsupported(config: TrainConfig) -> str | None:
    """Why the fused step cannot train config (a sentence saying what to do), or None."""
    if "fused" not in training_rule(config.arch).steps:
        fused = " or ".join(f'`arch="{name}"`' for name in rule_names() if "fused" in training_rule(name).steps)
        return f"the fused step trains {fused} only, not {config.arch}; use `step=\"autograd\"`"
    if config.aux not in FUSED_AUX:
        return f"the fused step supports `aux` {' or '.join(FUSED_AUX)}, not {config.aux}; pass one of those or use `step=\"autograd\"`"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return 'the fused step trains in one process (data-parallel runs use the autograd step); use `step="autograd"`'
    if torch.device(config.device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return (f'the fused step runs Triton kernels, which need `device="cuda"` (not {config.device}; '
                'the CPU runs them only under TRITON_INTERPRET=1, slowly, for tests); use `device="cuda"` or `step="autograd"`')
    return None


def choose_trainer(config: TrainConfig, step: str = "auto") -> type[Trainer]:
    """The trainer class for `--step`: "autograd" Trainer; "fused" FusedTopKTrainer or a
    SAEError saying why not; "auto" FusedTopKTrainer on CUDA where supported, else
    Trainer."""
    if step not in STEPS:
        raise SAEError(f"unknown `step=\"{step}\"`: choose one of {', '.join(STEPS)}")
    if step == "autograd":
        return Trainer
    why = fused_unsupported(config)
    if step == "fused":
        if why is not None:
            raise SAEError(f'`step="fused"` cannot train this run: {why}')
        return FusedTopKTrainer
    fast = why is None and torch.device(config.device).type == "cuda"
    return FusedTopKTrainer if fast else Trainer


class FusedTopKTrainer(Trainer):
    """Trainer whose step is FusedTopKStep (see the module doc). Build with start / resume."""

    step_kind = "fused"

    def __init__(self, config: TrainConfig, source: ActivationSource, out: Path | None, command: list[str] | None) -> None:
        why = fused_unsupported(config)
        if why is not None:
            raise SAEError(why)
        super().__init__(config, source, out, command)
        # shares the model's storage: the weights Trainer initialises or loads are the step's
        # --precision bf16 on CUDA: bf16 also for the decoder's loss gradient and the weights'
        # Adam moments (H100: 6% more tokens/s, a quarter less memory, FVU within the spread
        # of init seeds over 4000 steps: bench/gpu_train.py, bench/gpu_adam_moments.py)
        low = torch.bfloat16 if self.on_cuda and config.precision == "bf16" else torch.float32
        self.fused = FusedTopKStep(
            self.model, lr=config.learning_rate, precision=config.precision if self.on_cuda else "fp32",
            grad_out_dtype=low, moments_dtype=low,
            k_aux=config.aux_k, aux_alpha=config.aux_alpha, force_triton=None if self.on_cuda else True,
        )
        self.use_graph = self.on_cuda  # bench/gpu_trainer.py turns it off to time the difference
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_warm = False
        self._graph_stream = torch.cuda.Stream() if self.use_graph else None
        self._graph_in: torch.Tensor | None = None
        self._graph_out: StepStats | None = None

    def _initialise(self) -> None:
        super()._initialise()
        self.fused.reload_weights()

    def train_step(self, batch: torch.Tensor) -> dict[str, torch.Tensor | float]:
        """One fused step; the same metrics as Trainer.train_step, with no host sync (with
        AuxK, one to read the dead features, as Trainer.train_step)."""
        cfg = self.config
        x = self._to_device(batch)
        lr = cfg.lr_at(self.step)
        self.fused.set_lr(lr)
        self._note_finite(x)
        # AuxK's dead features: none before dead_tokens tokens (tokens_since_fired <= tokens
        # seen), and reading them is a host sync, once a step, as on the autograd step
        dead = None
        if cfg.aux == "auxk" and self.step * cfg.batch_size >= cfg.dead_tokens:
            dead = torch.nonzero(self.aux_weights() > 0).squeeze(1)
        if dead is not None and dead.numel():
            stats = self.fused.step(x, dead_features=dead)
        else:
            stats = self._step_without_aux(x)
        return self.end_step(stats.fired, stats.sq_err, stats.l0.float(), stats.loss, len(x), stats.variance[0], stats.aux, lr)

    def _step_without_aux(self, x: torch.Tensor) -> StepStats:
        """fused.step(x); on CUDA, from the second such step on, the replay of one
        CUDA graph of it: issuing the step's ~30 kernels one by one takes the host about as
        long as the GPU takes to run them (bench/gpu_trainer.py, BENCHMARKS.md). The first
        step runs them eagerly, which compiles the Triton kernels before the capture. The
        graph reads x from its own buffer and writes the same StepStats tensors
        at every replay (end_step reads them before the next one)."""
        if not self.use_graph or (self._graph is not None and x.shape != self._graph_in.shape):
            return self.fused.step(x)
        if self._graph is None:
            side = self._graph_stream  # the warm-up runs where the capture will (torch's recipe)
            side.wait_stream(torch.cuda.current_stream())
            if not self._graph_warm:
                self._graph_warm = True
                with torch.cuda.stream(side):
                    stats = self.fused.step(x)
                torch.cuda.current_stream().wait_stream(side)
                return stats
            self._graph_in = x.clone()
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph, stream=side):
                self._graph_out = self.fused.step(self._graph_in)
        else:
            self._graph_in.copy_(x)
        self._graph.replay()
        return self._graph_out

    # ---- checkpoints: the step's moments travel in torch.optim.Adam's layout ----------------
    def _adam_moments(self) -> dict[torch.nn.Parameter, tuple[torch.Tensor, torch.Tensor]]:
        """(exp_avg, exp_avg_sq) of each parameter, shaped like it: views of the step's tensors
        (W_enc's are the transposes of the step's feature-major ones)."""
        model, moments = self.model, self.fused.moments
        return {
            model.W_enc: (moments["W_enc_t"][0].t(), moments["W_enc_t"][1].t()),
            model.b_enc: moments["b_enc"],
            model.W_dec: moments["W_dec"],
            model.b_dec: self.fused.b_dec_moments,
        }

    def state(self) -> dict[str, Any]:
        step = self.fused.step_count.reshape(())
        for param, (m, v) in self._adam_moments().items():
            self.optimizer.state[param] = {"step": step.clone(), "exp_avg": m.contiguous().float(), "exp_avg_sq": v.contiguous().float()}
        state = super().state()
        self.optimizer.state.clear()  # the returned dict keeps them until they are saved
        return state

    def _load_state(self, state: dict[str, Any]) -> None:
        super()._load_state(state)  # weights in place; the moments into self.optimizer.state
        for param, (m, v) in self._adam_moments().items():
            saved = self.optimizer.state.get(param)
            if saved:  # none before the first step
                m.copy_(saved["exp_avg"])
                v.copy_(saved["exp_avg_sq"])
                self.fused.step_count.copy_(saved["step"].reshape(1))
        self.optimizer.state.clear()
        self.fused.reload_weights()
