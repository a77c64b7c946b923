"""Every setting of one SAE training run, validated once, saved in training.json and the
checkpoint (resume refuses a checkpoint whose shape-defining settings differ)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from sae.errors import SAEError
from sae.rules.gba import LADDER_SPAN, default_buffer_tokens, default_targets

ARCHS = ("topk", "mutual-choice", "gba")
PRECISIONS = ("bf16", "fp32")
AUX_LOSSES = ("auxk", "aux-zipf", "none")
DEFAULT_AUX = {"topk": "auxk", "mutual-choice": "aux-zipf", "gba": "none"}
#: Settings a resumed run must share with its checkpoint.
SHAPE_KEYS = ("arch", "d_in", "d_sae", "k", "batch_size", "seed")


def default_lr(d_sae: int) -> float:
    """Gao et al.'s Adam scaling: 2e-4 / sqrt(d_sae / 2^14)."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


@dataclass
class TrainConfig:
    arch: str
    d_in: int
    d_sae: int
    tokens: int
    k: int | None = None
    batch_size: int = 4096
    lr: float | None = None
    seed: int = 0
    device: str = "cpu"
    #: "bf16": on CUDA the encoder product runs under bf16 autocast (fp32 master weights);
    #: "fp32": no autocast. CPU training is fp32 either way.
    precision: str = "bf16"
    aux: str | None = None
    aux_alpha: float = 1 / 32
    k_aux: int | None = None
    dead_tokens: int = 1_000_000
    density_decay: float = 0.99
    warmup_steps: int | None = None
    decay_fraction: float = 0.2
    init_tokens: int = 65536
    theta_decay: float = 0.99
    gba_groups: int = 10
    #: GBA's highest and lowest target frequencies; None: set from d_sae (sae.rules.gba)
    gba_p_max: float | None = None
    gba_p_min: float | None = None
    gba_every: int | None = None
    gba_gamma: float = 0.01
    gba_eps: float = 1e-6
    log_every: int | None = None
    #: checkpoint every this many steps; None: every checkpoint_minutes of training (a
    #: checkpoint of a wide SAE is hundreds of MB, too many to write every few seconds)
    checkpoint_every: int | None = None
    checkpoint_minutes: float = 10.0

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise SAEError(f"unknown `arch=\"{self.arch}\"`: choose one of {', '.join(ARCHS)}")
        if self.d_in <= 0 or self.d_sae <= 0:
            raise SAEError(f"SAE width must be positive (d_in={self.d_in}, d_sae={self.d_sae})")
        if self.arch in ("topk", "mutual-choice"):
            if self.k is None:
                raise SAEError(f'`arch="{self.arch}"` needs `k` (active features per token)')
            if not 0 < self.k <= self.d_sae:
                raise SAEError(f"`k={self.k}` must be between 1 and d_sae={self.d_sae}; lower `k` or widen the SAE")
        if self.precision not in PRECISIONS:
            raise SAEError(f"unknown `precision=\"{self.precision}\"`: choose one of {', '.join(PRECISIONS)}")
        if self.batch_size <= 0:
            raise SAEError(f"`batch_size={self.batch_size}` must be positive")
        if self.tokens < self.batch_size:
            raise SAEError(f"`tokens={self.tokens}` is less than one batch ({self.batch_size}); train on more tokens")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise SAEError(f"`lr` must be a positive number, got {self.lr}")
        if self.aux is None:
            self.aux = DEFAULT_AUX[self.arch]
        if self.aux not in AUX_LOSSES:
            raise SAEError(f"unknown aux loss `aux=\"{self.aux}\"`: choose one of {', '.join(AUX_LOSSES)}")
        if self.gba_p_max is None:
            self.gba_p_max = default_targets(self.d_sae)[0]
        if self.gba_p_min is None:
            self.gba_p_min = self.gba_p_max / LADDER_SPAN
        if self.arch == "gba" and not 0 < self.gba_p_min <= self.gba_p_max <= 1:
            raise SAEError("GBA targets need 0 < `gba_p_min` <= `gba_p_max` <= 1")
        if self.gba_every is None:
            self.gba_every = max(1, round(default_buffer_tokens(self.gba_p_min) / self.batch_size))
        if self.gba_every <= 0:
            raise SAEError(f"`gba_every={self.gba_every}` must be a positive number of steps")

    # ---- derived settings --------------------------------------------------------------
    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else default_lr(self.d_sae)

    @property
    def aux_k(self) -> int:
        return self.k_aux if self.k_aux is not None else max(1, self.d_in // 2)

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(1000, self.steps // 20)

    @property
    def log_interval(self) -> int:
        return self.log_every or max(1, self.steps // 200)

    def checkpoint_due(self, step: int, seconds_since_last: float) -> bool:
        """Whether the run writes a checkpoint after this step (the last one always does)."""
        if self.checkpoint_every is not None:
            return step % self.checkpoint_every == 0
        return seconds_since_last >= 60 * self.checkpoint_minutes

    def lr_at(self, step: int) -> float:
        """Linear warm-up, constant, then linear decay to 0 over the last decay_fraction."""
        scale = 1.0
        if self.warmup > 0 and step < self.warmup:
            scale = (step + 1) / self.warmup
        decay_start = int(self.steps * (1 - self.decay_fraction))
        if self.decay_fraction > 0 and step >= decay_start:
            scale *= max(0.0, (self.steps - step) / max(1, self.steps - decay_start))
        return self.learning_rate * scale

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
