"""Training one SAE: Adam, unit-norm decoder rows, normalised inputs, dead-feature tracking,
auxiliary losses, checkpoints with exact resume, and a guard against NaN/Inf.

The trainer owns everything a resumed run needs (model and rule buffers, optimiser, step,
input scale, per-feature counters) and writes it to OUT/checkpoint.pt; the data stream is
restarted at the batch number the checkpoint reached, so an interrupted run continued from
its checkpoint ends in the same state as an uninterrupted one.

The step itself is a sae.step.TrainStep (sae.step_choice.build_step picks it: the
autograd step, the fused TopK step, the data-parallel ones, the latent-sharded one; on
CUDA the one-process fused step replayed as CUDA graphs); the Trainer owns the loop, the counters, the NaN/Inf guard and the
checkpoints, where the step's optimiser state travels in torch Adam's layout. The kernels'
backend is resolved once, from the `backend` argument or the device
(sae.kernels.backend.resolve_backend).

On CUDA batches are copied from pinned memory without blocking, and the NaN/Inf guard is
a pair of device-side flags that fit() reads at each log step and before anything is
written (checkpoint, SAE), naming the steps since the last check: the fused TopK and
Mutual Choice steps never wait for the GPU (the auxiliary losses' feature count reaches the
host a step late: sae.aux_capacity; GBA's fused selection reads its count). On CPU the
same code checks the flags every step.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from sae.config import TrainConfig
from sae.data import ActivationSource
from sae.errors import SAEError
from sae.io import save_sae
from sae.kernels.backend import resolve_backend
from sae.losses import zipf_underuse
from sae.model import SparseAutoencoder
from sae.registry import training_rule
from sae.rules import SparsityRule
from sae.step import StepStats
from sae.step_choice import build_step
from sae.tensorboard import EVENTS_FILE, write_events

CHECKPOINT_FILE = "checkpoint.pt"
RECORD_FILE = "training.json"


def make_rule(config: TrainConfig) -> SparsityRule:
    """The training rule the config names, built by its registration from its settings."""
    return training_rule(config.arch).build(config.rule, config)


def geometric_median(x: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Weiszfeld iterations from the mean: a b_dec start robust to outlier tokens."""
    guess = x.mean(dim=0)
    for _ in range(iters):
        w = 1 / (x - guess).norm(dim=1).clamp(min=1e-8)
        guess = (w[:, None] * x).sum(dim=0) / w.sum()
    return guess


def data_tokens(described: dict[str, Any]) -> int | None:
    """Tokens in one pass over a source, from its describe() (None for an endless stream)."""
    held = described.get("store_tokens", described.get("tokens"))
    return int(held) if held else None


def _check_finite(x: torch.Tensor, what: str, step: int) -> None:
    if not torch.isfinite(x).all():
        raise SAEError(f"non-finite values (NaN or Inf) in {what} at step {step}; check the activations (or lower `lr`) and rerun")


#: What torch.load and loading the state raise on a file that is not a checkpoint of ours.
CHECKPOINT_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, KeyError, TypeError, ValueError, AttributeError)


def _not_a_checkpoint(path: Path, err: BaseException) -> SAEError:
    if isinstance(err, pickle.UnpicklingError):
        first = "it holds objects other than tensors and plain values, so it was not loaded"
    else:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return SAEError(f"cannot resume: {path} is not a checkpoint this trainer wrote ({first})")


def _check_writable_folder(out: Path) -> None:
    """Refuse an `out` that is a file or lies where no folder can be made, before training."""
    if out.exists() and not out.is_dir():
        raise SAEError(f"`out={out}` is a file, not a folder: choose another `out`")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise SAEError(f"`out={out}`: {existing} is a file, so no folder can be made there")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SAEError(f"`out={out}`: {existing} is not writable")


def _steps(first: int, last: int) -> str:
    return f"at step {first}" if first >= last else f"between steps {first} and {last}"


class Trainer:
    """Build with Trainer.start (fresh) or Trainer.resume (from OUT/checkpoint.pt), then fit().
    step: sae.step_choice.STEPS ("auto": fused where it can train on CUDA); backend:
    "triton", "torch" or None (by the device)."""

    def __init__(self, config: TrainConfig, source: ActivationSource, out: Path | None, command: list[str] | None,
                 step: str = "auto", backend: str | None = None) -> None:
        if source.d_in != config.d_in:
            raise SAEError(f"data has width {source.d_in} but the SAE expects d_in={config.d_in}")
        source_out = getattr(source, "d_out", None)
        if source_out != config.d_out:
            what = f"targets of width {source_out}" if source_out is not None else "no targets"
            raise SAEError(f"data has {what} but the config asks for `d_out={config.d_out}`")
        self.config, self.source, self.out = config, source, out
        self.command = command if command is not None else list(sys.argv)
        #: whether this process writes `out` (under torchrun rank 0 alone; the others still
        #: take part in what a save gathers from the ranks)
        self.writer = True
        self.device = torch.device(config.device)
        self.backend = resolve_backend(self.device, backend)
        torch.manual_seed(config.seed)
        #: where the model lives: the device, or host memory for a step that trains shards
        #: of it on the ranks' devices (sae.latent_shard)
        self.model_device = torch.device("cpu") if step == "shard-latents" else self.device
        self.model = SparseAutoencoder(config.d_in, config.d_sae, make_rule(config), config.d_out, config.skip).to(self.model_device)
        self.model.backend = self.backend
        self.on_cuda = self.device.type == "cuda"
        #: the training step (sae.step.TrainStep)
        self.stepper = build_step(config, self.model, step, self.backend)
        self.step = 0
        self.input_scale = 1.0
        #: the target's scale (a transcoder's; an autoencoder's target is its input)
        self.target_scale = 1.0
        self.tokens_since_fired = torch.zeros(config.d_sae, dtype=torch.long, device=self.device)
        self.density = torch.zeros(config.d_sae, device=self.device)
        self.history: list[dict[str, float]] = []
        # the NaN/Inf guard: device flags and-ed every step, read by check_finite()
        self._data_ok = torch.ones((), dtype=torch.bool, device=self.device)
        self._loss_ok = torch.ones((), dtype=torch.bool, device=self.device)
        self._unchecked_from: int | None = None  # first step not yet covered by a check
        self._last_loss = torch.zeros((), device=self.device)

    @property
    def step_kind(self) -> str:
        """Which step implementation trains (training.json's "step_kind")."""
        return self.stepper.kind

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def start(cls, config: TrainConfig, source: ActivationSource, out: str | Path | None = None, command: list[str] | None = None,
              step: str = "auto", backend: str | None = None) -> Trainer:
        """A fresh run: weights and input scale initialised from the first init_tokens of the stream."""
        out_path = Path(out) if out is not None else None
        if out_path is not None:
            _check_writable_folder(out_path)
        if out_path is not None and (out_path / CHECKPOINT_FILE).exists():
            raise SAEError(f"{out_path} already holds a training run; continue it with `resume` or choose another `out`")
        trainer = cls(config, source, out_path, command, step, backend)
        trainer._initialise()
        return trainer

    @classmethod
    def resume(cls, out: str | Path, source: ActivationSource, config: TrainConfig | None = None, command: list[str] | None = None,
               step: str = "auto", backend: str | None = None) -> Trainer:
        """Continue the run in OUT; config (if given) must match the checkpoint's shape settings."""
        out_path = Path(out)
        path = out_path / CHECKPOINT_FILE
        if not path.is_file():
            raise SAEError(f"nothing to resume: {path} does not exist (start a new run without `resume`)")
        try:  # weights_only: a checkpoint is tensors and plain values; a pickle that runs code is refused
            with warnings.catch_warnings():  # torch warns about foreign pickle protocols; the refusal says it all
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
            saved = TrainConfig.from_dict(state["config"])
        except CHECKPOINT_ERRORS as err:
            raise _not_a_checkpoint(path, err) from err
        if config is not None:
            theirs = config.shape()
            diffs = [f"{k}={v} (checkpoint) vs {theirs.get(k)}" for k, v in saved.shape().items() if theirs.get(k) != v]
            if diffs:
                raise SAEError(f"cannot resume {out_path}: settings differ: {'; '.join(diffs)}; use the checkpoint's settings or another `out`")
            saved = config
        trainer = cls(saved, source, out_path, command, step, backend)
        try:
            trainer._load_state(state)
        except CHECKPOINT_ERRORS as err:
            raise _not_a_checkpoint(path, err) from err
        return trainer

    @torch.no_grad()
    def _initialise(self) -> None:
        cfg = self.config
        parts, held = [], 0
        for batch in self.source.batches(cfg.batch_size, 0):
            parts.append(batch)
            held += len(batch)
            if held >= cfg.init_tokens:
                break
        sample = torch.cat(parts)[: max(cfg.init_tokens, 1)].to(self.device, torch.float32)
        _check_finite(sample, "the training data", 0)
        x, y = self._split(sample)
        self.input_scale = self._scale_of(x, "training activations")
        self.target_scale = self.input_scale if y is x else self._scale_of(y, "target activations")
        generator = torch.Generator().manual_seed(cfg.seed)
        self.model.init_weights(generator, geometric_median(y * self.target_scale).cpu())
        self.model.to(self.model_device)
        if self.model.rule.scale_free_selection:
            target = None if y is x else (y * self.target_scale).to(self.model_device)
            self.model.fit_encoder_scale((x * self.input_scale).to(self.model_device), target)
        self.density.fill_(training_rule(cfg.arch).initial_density(self.model.rule, cfg))
        self.stepper.weights_changed()

    @staticmethod
    def _scale_of(x: torch.Tensor, what: str) -> float:
        """1 / the RMS norm of the rows: what brings them to unit mean squared norm."""
        mean_sq = x.pow(2).sum(dim=1).mean()
        if mean_sq <= 0:
            raise SAEError(f"the {what} are all zero; nothing to learn")
        return float(mean_sq.rsqrt())

    def _split(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, target) of a batch: a transcoder's rows are input then target; an
        autoencoder's target is its input (the same tensor)."""
        if self.config.d_out is None:
            return batch, batch
        return batch[:, : self.config.d_in], batch[:, self.config.d_in :]

    def _load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.stepper.load_optimizer_state(state["optimizer"])
        self.stepper.weights_changed()
        self.step = int(state["step"])
        self.input_scale = float(state["input_scale"])
        self.target_scale = float(state.get("target_scale", self.input_scale))
        self.tokens_since_fired.copy_(state["tokens_since_fired"])
        self.density.copy_(state["density"])
        self.history = list(state["history"])

    # ---- one step ----------------------------------------------------------------------
    def aux_weights(self) -> torch.Tensor | None:
        """Per-feature weight in the auxiliary loss: 1 for dead features (AuxK; None before
        dead_tokens tokens, when none can be dead), the Zipf deficit (aux_zipf), or None
        when the run has no auxiliary loss."""
        if self.config.aux == "auxk":
            if self.step * self.config.batch_size < self.config.dead_tokens:
                return None
            return (self.tokens_since_fired >= self.config.dead_tokens).float()
        if self.config.aux == "aux-zipf":
            return zipf_underuse(self.density)
        return None

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        if self.on_cuda and batch.device.type == "cpu":
            batch = batch.pin_memory().to(self.device, non_blocking=True)  # no wait on the GPU
        return batch.to(self.device, torch.float32)

    def train_step(self, batch: torch.Tensor) -> dict[str, torch.Tensor | float]:
        """One optimiser step through the step. Metrics come back as device tensors (read
        them only when logging: each read is a host-device sync). Non-finite data or loss
        only sets a device flag here; check_finite() (called by fit) turns it into an error.
        On CPU, where reading it costs nothing, every step checks it."""
        lr = self.config.lr_at(self.step)
        self.stepper.set_lr(lr)
        aux = self.stepper.prepare_aux(self.aux_weights())
        if self.config.d_out is None:
            x = self._to_device(batch) * self.input_scale
            self._data_ok &= torch.isfinite(x).all()
            stats = self.stepper(x, aux)
        else:
            x, y = self._split(self._to_device(batch))
            x, y = x * self.input_scale, y * self.target_scale
            self._data_ok &= torch.isfinite(x).all() & torch.isfinite(y).all()
            stats = self.stepper(x, aux, y)
        return self._after_step(stats, lr)

    @torch.no_grad()
    def _after_step(self, stats: StepStats, lr: float) -> dict[str, torch.Tensor | float]:
        """The bookkeeping after the weights moved: the loss's NaN/Inf flag, dead-feature
        counters, densities, the rule's hook, the step count; returns the step's metrics."""
        cfg, model, n = self.config, self.model, stats.tokens
        self._loss_ok &= torch.isfinite(stats.loss)
        self._last_loss = stats.loss
        self.tokens_since_fired += n
        self.tokens_since_fired.masked_fill_(stats.fired > 0, 0)
        self.density.mul_(cfg.density_decay).add_((1 - cfg.density_decay) * stats.fired / n)
        model.rule.after_step(model, self.step)
        if self._unchecked_from is None:
            self._unchecked_from = self.step
        self.step += 1
        if not self.on_cuda:
            self.check_finite()
        return {
            "fvu": stats.sq_err / stats.variance,
            "aux": stats.aux,
            "l0": stats.l0 / n,
            "dead_fraction": (self.tokens_since_fired >= cfg.dead_tokens).float().mean(),
            "lr": lr,
        }

    def check_finite(self) -> None:
        """Raise if a step since the last check saw NaN/Inf data or a non-finite loss: one
        host-device sync. fit() calls it at every log step and before every write."""
        if self._unchecked_from is None:
            return
        first, last = self._unchecked_from, self.step - 1
        data_ok, loss_ok = bool(self._data_ok), bool(self._loss_ok)
        if data_ok and loss_ok:
            self._unchecked_from = None
            return
        # the flags stay down: this trainer's state is diverged and every later check fails
        if not data_ok:
            raise SAEError(
                f"non-finite values (NaN or Inf) in the training data {_steps(first, last)}; "
                "check the activations (or lower `lr`) and rerun"
            )
        if not loss_ok:
            raise SAEError(
                f"training diverged: the loss became {float(self._last_loss)} {_steps(first, last)}; lower `lr` "
                "(the last checkpoint in `out` is intact)"
            )

    # ---- the loop ----------------------------------------------------------------------
    def fit(self, until_step: int | None = None, progress: bool = True) -> SparseAutoencoder:
        """Train to config.steps (or until_step), checkpointing as it goes; returns the model.
        History rows carry the seconds since this call began (elapsed_s), so a rate can be
        read between any two rows, and the passes made over the data so far."""
        from tqdm import tqdm

        cfg = self.config
        stop = min(cfg.steps, until_step) if until_step is not None else cfg.steps
        held = data_tokens(self.source.describe())
        bar = tqdm(total=cfg.steps, initial=self.step, unit="step", disable=not progress, dynamic_ncols=True)
        started, start_step = time.perf_counter(), self.step
        last_save = started
        try:
            for batch in self.source.batches(cfg.batch_size, self.step):
                if self.step >= stop:
                    break
                step_metrics = self.train_step(batch)
                now = time.perf_counter()
                save_now = self.out is not None and self.step < stop and cfg.checkpoint_due(self.step, now - last_save)
                log_now = self.step % cfg.log_interval == 0 or self.step == stop
                if log_now or save_now:
                    self.check_finite()  # the step's only host sync, and only on these steps
                if log_now:
                    metrics = {k: float(v) for k, v in step_metrics.items()}
                    tokens = self.step * cfg.batch_size
                    tokens_per_s = (self.step - start_step) * cfg.batch_size / max(now - started, 1e-9)
                    row = {"step": self.step, "tokens": tokens, "tokens_per_s": tokens_per_s, "elapsed_s": now - started, **metrics}
                    if held:
                        row["passes"] = tokens / held
                    self.history.append(row)
                    postfix = {"tok_s": f"{tokens_per_s:,.0f}", "fvu": f"{metrics['fvu']:.3f}", "l0": f"{metrics['l0']:.1f}",
                               "dead": f"{metrics['dead_fraction']:.2f}"}
                    if held and cfg.tokens > held:
                        postfix["pass"] = f"{tokens / held:.1f}/{cfg.tokens / held:.1f}"
                    bar.set_postfix(postfix)
                bar.update(1)
                if save_now:
                    self.save_checkpoint()
                    last_save = time.perf_counter()
        finally:
            bar.close()
        if self.out is not None:
            self.save_checkpoint()
            if self.step >= cfg.steps:
                self.save_sae(self.out)
        return self.model

    # ---- outputs -----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        self.stepper.weights_to_model()
        return {
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.stepper.optimizer_state(),
            "step": self.step,
            "input_scale": self.input_scale,
            "target_scale": self.target_scale,
            "tokens_since_fired": self.tokens_since_fired.cpu(),
            "density": self.density.cpu(),
            "history": self.history,
        }

    def save_checkpoint(self) -> None:
        """OUT/checkpoint.pt, OUT/training.json and its curves as a TensorBoard event file
        (sae/tensorboard.py), each replaced atomically (never from a diverged state: raises first if a step since the last check went non-finite). A
        write that fails (unwritable folder, full disk) leaves the last checkpoint as it was."""
        assert self.out is not None
        self.check_finite()
        state = self.state()
        if not self.writer:
            return
        data = self.source.describe()
        held = data_tokens(data)
        record = {
            "command": self.command,
            "config": self.config.to_dict(),
            "step_kind": self.step_kind,
            "data": data,
            "passes": self.config.tokens / held if held else None,
            "input_scale": self.input_scale,
            "target_scale": self.target_scale,
            "step": self.step,
            "tokens_seen": self.step * self.config.batch_size,
            "finished": self.step >= self.config.steps,
            "history": self.history,
        }
        tmp = self.out / f".{CHECKPOINT_FILE}.tmp"
        tmp_json = self.out / f".{RECORD_FILE}.tmp"
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as handle:  # through Python's file, so a failed write is an OSError
                torch.save(state, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.out / CHECKPOINT_FILE)
            tmp_json.write_text(json.dumps(record, indent=1))
            os.replace(tmp_json, self.out / RECORD_FILE)
            write_events(self.out / EVENTS_FILE, self.history)
        except OSError as err:
            for leftover in (tmp, tmp_json):
                with contextlib.suppress(OSError):
                    leftover.unlink(missing_ok=True)
            raise SAEError(f"cannot write the checkpoint in {self.out} ({err.strerror or err}); the last checkpoint there "
                           "is intact: free space or choose another `out`, then resume") from err

    def saelens_metadata(self) -> dict[str, Any]:
        data = self.source.describe()
        target = {"hook_name_out": data.get("target_hook")} if self.config.d_out is not None else {}
        return {
            "model_name": data.get("model_name"),
            "hook_name": data.get("hook"),
            **target,
            "context_size": data.get("context_size"),
            "prepend_bos": True,
            "dataset_path": data.get("dataset_path"),
            "workbench": {"arch": self.config.arch, "k": getattr(self.config.rule, "k", None), "input_scale": self.input_scale,
                          "tokens": self.step * self.config.batch_size,
                          **({"target_scale": self.target_scale} if self.config.d_out is not None else {})},
        }

    def save_sae(self, folder: str | Path) -> Path:
        """The trained SAE as a SAELens folder (input and target scales folded into the weights)."""
        self.check_finite()
        self.stepper.weights_to_model()
        if not self.writer:
            return Path(folder)
        return save_sae(folder, self.model, self.input_scale, self.saelens_metadata(), target_scale=self.target_scale)
