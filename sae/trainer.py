"""Training one SAE: Adam, unit-norm decoder rows, normalised inputs, dead-feature tracking,
auxiliary losses, checkpoints with exact resume, and a guard against NaN/Inf.

The trainer owns everything a resumed run needs (model and rule buffers, optimiser, step,
input scale, per-feature counters) and writes it to OUT/checkpoint.pt; the data stream is
restarted at the batch number the checkpoint reached, so an interrupted run continued from
its checkpoint ends in the same state as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sae.config import SHAPE_KEYS, TrainConfig
from sae.data import ActivationSource
from sae.io import save_sae
from sae.losses import aux_candidates, aux_reconstruction_loss, fvu, zipf_underuse
from sae.model import SparseAutoencoder
from sae.rules import GBARule, MutualChoiceRule, SparsityRule, TopKRule
from workbench.errors import WorkbenchError

CHECKPOINT_FILE = "checkpoint.pt"
RECORD_FILE = "training.json"


def make_rule(config: TrainConfig) -> SparsityRule:
    """The training rule the config names."""
    if config.arch == "topk":
        return TopKRule(config.k)
    if config.arch == "mutual-choice":
        return MutualChoiceRule(config.k, theta_decay=config.theta_decay)
    return GBARule(
        config.d_sae, groups=config.gba_groups, p_max=config.gba_p_max, p_min=config.gba_p_min,
        every=config.gba_every, gamma=config.gba_gamma, eps=config.gba_eps, seed=config.seed,
    )


def geometric_median(x: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Weiszfeld iterations from the mean: a b_dec start robust to outlier tokens."""
    guess = x.mean(dim=0)
    for _ in range(iters):
        w = 1 / (x - guess).norm(dim=1).clamp(min=1e-8)
        guess = (w[:, None] * x).sum(dim=0) / w.sum()
    return guess


def _check_finite(x: torch.Tensor, what: str, step: int) -> None:
    if not torch.isfinite(x).all():
        raise WorkbenchError(f"non-finite values (NaN or Inf) in {what} at step {step}; check the activations (or lower --lr) and rerun")


class Trainer:
    """Build with Trainer.start (fresh) or Trainer.resume (from OUT/checkpoint.pt), then fit()."""

    def __init__(self, config: TrainConfig, source: ActivationSource, out: Path | None, command: list[str] | None) -> None:
        if source.d_in != config.d_in:
            raise WorkbenchError(f"data has width {source.d_in} but the SAE expects d_in={config.d_in}")
        self.config, self.source, self.out = config, source, out
        self.command = command if command is not None else list(sys.argv)
        self.device = torch.device(config.device)
        torch.manual_seed(config.seed)
        self.model = SparseAutoencoder(config.d_in, config.d_sae, make_rule(config)).to(self.device)
        self.optimizer = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=config.learning_rate)
        self.step = 0
        self.input_scale = 1.0
        self.tokens_since_fired = torch.zeros(config.d_sae, dtype=torch.long, device=self.device)
        self.density = torch.zeros(config.d_sae, device=self.device)
        self.history: list[dict[str, float]] = []

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def start(cls, config: TrainConfig, source: ActivationSource, out: str | Path | None = None, command: list[str] | None = None) -> Trainer:
        """A fresh run: weights and input scale initialised from the first init_tokens of the stream."""
        out_path = Path(out) if out is not None else None
        if out_path is not None and (out_path / CHECKPOINT_FILE).exists():
            raise WorkbenchError(f"{out_path} already holds a training run; pass --resume to continue it or choose another --out")
        trainer = cls(config, source, out_path, command)
        trainer._initialise()
        return trainer

    @classmethod
    def resume(cls, out: str | Path, source: ActivationSource, config: TrainConfig | None = None, command: list[str] | None = None) -> Trainer:
        """Continue the run in OUT; config (if given) must match the checkpoint's shape settings."""
        out_path = Path(out)
        path = out_path / CHECKPOINT_FILE
        if not path.is_file():
            raise WorkbenchError(f"nothing to resume: {path} does not exist (drop --resume to start a new run)")
        state = torch.load(path, map_location="cpu", weights_only=False)
        saved = TrainConfig.from_dict(state["config"])
        if config is not None:
            diffs = [f"{k}={getattr(saved, k)} (checkpoint) vs {getattr(config, k)}" for k in SHAPE_KEYS if getattr(saved, k) != getattr(config, k)]
            if diffs:
                raise WorkbenchError(f"cannot resume {out_path}: settings differ: {'; '.join(diffs)}; use the checkpoint's settings or another --out")
            saved = config
        trainer = cls(saved, source, out_path, command)
        trainer._load_state(state)
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
        sample = torch.cat(parts)[: max(cfg.init_tokens, 1)].to(self.device)
        _check_finite(sample, "the training data", 0)
        mean_sq = sample.pow(2).sum(dim=1).mean()
        if mean_sq <= 0:
            raise WorkbenchError("the training activations are all zero; nothing to learn")
        self.input_scale = float(mean_sq.rsqrt())
        generator = torch.Generator().manual_seed(cfg.seed)
        self.model.init_weights(generator, geometric_median(sample * self.input_scale).cpu())
        self.model.to(self.device)
        budget = (cfg.k or 0) / cfg.d_sae if cfg.k else float(getattr(self.model.rule, "target", torch.zeros(1)).mean())
        self.density.fill_(budget)

    def _load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.input_scale = float(state["input_scale"])
        self.tokens_since_fired.copy_(state["tokens_since_fired"])
        self.density.copy_(state["density"])
        self.history = list(state["history"])

    # ---- one step ----------------------------------------------------------------------
    def aux_weights(self) -> torch.Tensor | None:
        """Per-feature weight in the auxiliary loss: 1 for dead features (AuxK), the Zipf
        deficit (aux_zipf), or None when the run has no auxiliary loss."""
        if self.config.aux == "auxk":
            return (self.tokens_since_fired >= self.config.dead_tokens).float()
        if self.config.aux == "aux-zipf":
            return zipf_underuse(self.density)
        return None

    def train_step(self, batch: torch.Tensor) -> dict[str, torch.Tensor | float]:
        """One optimiser step. Metrics come back as device tensors (read them only when
        logging: each read is a host-device sync); one sync a step checks the loss is finite."""
        cfg, model = self.config, self.model
        x = batch.to(self.device, torch.float32) * self.input_scale
        lr = cfg.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        model.train()
        weights = self.aux_weights()
        select_aux = None if weights is None else (lambda z: aux_candidates(z, weights, cfg.aux_k))
        x_hat, code, aux_code = model(x, select_aux)
        main = fvu(x, x_hat)
        if aux_code is not None and weights is not None:
            aux = aux_reconstruction_loss(aux_code, (x - x_hat).detach(), weights, model.decode_directions)
        else:
            aux = main.new_zeros(())
        loss = main + cfg.aux_alpha * aux
        if not torch.isfinite(loss):
            _check_finite(batch, "the training data", self.step)
            raise WorkbenchError(
                f"training diverged: loss is {loss.item()} at step {self.step}; lower --lr "
                "(the last checkpoint in --out is intact)"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        model.remove_parallel_decoder_grad()
        self.optimizer.step()
        model.normalize_decoder()
        with torch.no_grad():
            fired = code.fired(cfg.d_sae)
            self.tokens_since_fired += len(x)
            self.tokens_since_fired[fired > 0] = 0
            self.density.mul_(cfg.density_decay).add_((1 - cfg.density_decay) * fired.float() / len(x))
            model.rule.after_step(model, self.step)
        self.step += 1
        return {
            "fvu": main.detach(),
            "aux": aux.detach(),
            "l0": code.l0().float().mean(),
            "dead_fraction": (self.tokens_since_fired >= cfg.dead_tokens).float().mean(),
            "lr": lr,
        }

    # ---- the loop ----------------------------------------------------------------------
    def fit(self, until_step: int | None = None, progress: bool = True) -> SparseAutoencoder:
        """Train to config.steps (or until_step), checkpointing as it goes; returns the model."""
        from tqdm import tqdm

        cfg = self.config
        stop = min(cfg.steps, until_step) if until_step is not None else cfg.steps
        bar = tqdm(total=cfg.steps, initial=self.step, unit="step", disable=not progress, dynamic_ncols=True)
        started, start_step = time.perf_counter(), self.step
        try:
            for batch in self.source.batches(cfg.batch_size, self.step):
                if self.step >= stop:
                    break
                step_metrics = self.train_step(batch)
                if self.step % cfg.log_interval == 0 or self.step == stop:
                    metrics = {k: float(v) for k, v in step_metrics.items()}
                    tokens_per_s = (self.step - start_step) * cfg.batch_size / max(time.perf_counter() - started, 1e-9)
                    self.history.append({"step": self.step, "tokens": self.step * cfg.batch_size, "tokens_per_s": tokens_per_s, **metrics})
                    bar.set_postfix(tok_s=f"{tokens_per_s:,.0f}", fvu=f"{metrics['fvu']:.3f}", l0=f"{metrics['l0']:.1f}", dead=f"{metrics['dead_fraction']:.2f}")
                bar.update(1)
                if self.out is not None and self.step % cfg.checkpoint_interval == 0 and self.step < stop:
                    self.save_checkpoint()
        finally:
            bar.close()
        if self.out is not None:
            self.save_checkpoint()
            if self.step >= cfg.steps:
                self.save_sae(self.out)
        return self.model

    # ---- outputs -----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "input_scale": self.input_scale,
            "tokens_since_fired": self.tokens_since_fired.cpu(),
            "density": self.density.cpu(),
            "history": self.history,
        }

    def save_checkpoint(self) -> None:
        """OUT/checkpoint.pt and OUT/training.json, each replaced atomically."""
        assert self.out is not None
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / f".{CHECKPOINT_FILE}.tmp"
        torch.save(self.state(), tmp)
        os.replace(tmp, self.out / CHECKPOINT_FILE)
        record = {
            "command": self.command,
            "config": self.config.to_dict(),
            "data": self.source.describe(),
            "input_scale": self.input_scale,
            "step": self.step,
            "tokens_seen": self.step * self.config.batch_size,
            "finished": self.step >= self.config.steps,
            "history": self.history,
        }
        tmp_json = self.out / f".{RECORD_FILE}.tmp"
        tmp_json.write_text(json.dumps(record, indent=1))
        os.replace(tmp_json, self.out / RECORD_FILE)

    def saelens_metadata(self) -> dict[str, Any]:
        data = self.source.describe()
        return {
            "model_name": data.get("model_name"),
            "hook_name": data.get("hook"),
            "context_size": data.get("context_size"),
            "prepend_bos": True,
            "dataset_path": data.get("dataset_path"),
            "workbench": {"arch": self.config.arch, "k": self.config.k, "input_scale": self.input_scale,
                          "tokens": self.step * self.config.batch_size},
        }

    def save_sae(self, folder: str | Path) -> Path:
        """The trained SAE as a SAELens folder (input scale folded into the weights)."""
        return save_sae(folder, self.model, self.input_scale, self.saelens_metadata())
