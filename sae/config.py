"""Every setting of one SAE training run, validated once, saved in training.json and the
checkpoint (resume refuses a checkpoint whose shape-defining settings differ).

The settings every rule shares are TrainConfig's fields; a rule's own (k, gba_every, ...)
are its registered RuleConfig (sae.registry), held in TrainConfig.rule. Callers and files
give both flat: TrainConfig(arch="topk", k=32, lr=1e-3), and to_dict / from_dict write and
read one flat dict, the layout of training.json and checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

from sae.errors import SAEError
from sae.registry import AUX_LOSSES, RuleConfig, rule_settings, training_rule

PRECISIONS = ("bf16", "fp32")
#: Settings a resumed run must share with its checkpoint, beside its rule's shape_keys.
SHAPE_KEYS = ("arch", "d_in", "d_sae", "d_out", "skip", "batch_size", "seed")
#: The fields TrainConfig's __init__ takes by position (the rest by name).
_REQUIRED = ("arch", "d_in", "d_sae", "tokens")


def default_lr(d_sae: int) -> float:
    """Gao et al.'s Adam scaling: 2e-4 / sqrt(d_sae / 2^14)."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


@dataclass(init=False)
class TrainConfig:
    """The run's shared settings and, in `rule`, its rule's (see the module doc)."""

    arch: str
    d_in: int
    d_sae: int
    tokens: int
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
    log_every: int | None = None
    #: checkpoint every this many steps; None: every checkpoint_minutes of training (a
    #: checkpoint of a wide SAE is hundreds of MB, too many to write every few seconds)
    checkpoint_every: int | None = None
    checkpoint_minutes: float = 10.0
    #: A transcoder's target width (None: an autoencoder, whose target is its input).
    d_out: int | None = None
    #: A skip transcoder: a linear term W_skip x added to the prediction (needs d_out).
    skip: bool = False

    #: The rule's own settings: an instance of its registered RuleConfig (set by __init__).
    rule: RuleConfig | None = None

    def __init__(self, arch: str, d_in: int, d_sae: int, tokens: int, rule: RuleConfig | None = None, **settings: Any) -> None:
        """settings: TrainConfig's other fields by name, and the rule's own (k=32, gba_every=5),
        which become `rule` (or pass `rule`, an instance of the rule's RuleConfig, instead).
        Settings of other registered rules are ignored, so one set of settings can configure
        runs of several rules; a name no rule has is refused."""
        self.arch, self.d_in, self.d_sae, self.tokens = arch, d_in, d_sae, tokens
        for f in fields(self):
            if f.name not in (*_REQUIRED, "rule"):
                setattr(self, f.name, settings.pop(f.name, f.default))
        spec = training_rule(arch)
        unknown = sorted(set(settings) - set(rule_settings()))
        if unknown:
            raise SAEError(f"unknown setting `{unknown[0]}`: neither a training setting nor a rule's")
        own = {f.name for f in fields(spec.config)}
        if rule is None:
            rule = spec.config(**{name: value for name, value in settings.items() if name in own and value is not None})
        elif not isinstance(rule, spec.config):
            raise SAEError(f"`rule` must be a {spec.config.__name__} for `arch=\"{arch}\"`, not {type(rule).__name__}")
        elif any(settings.get(name) is not None for name in own):
            raise SAEError(f"give `arch=\"{arch}\"`'s settings ({', '.join(sorted(own))}) in `rule` or by name, not both")
        self.rule = dataclasses.replace(rule)
        self._check(spec.default_aux)

    def _check(self, default_aux: str) -> None:
        if self.d_in <= 0 or self.d_sae <= 0:
            raise SAEError(f"SAE width must be positive (d_in={self.d_in}, d_sae={self.d_sae})")
        if self.d_out is not None and self.d_out <= 0:
            raise SAEError(f"`d_out={self.d_out}` must be positive")
        if self.skip and self.d_out is None:
            raise SAEError("`skip=True` is a skip transcoder: give the target width `d_out` too")
        if self.precision not in PRECISIONS:
            raise SAEError(f"unknown `precision=\"{self.precision}\"`: choose one of {', '.join(PRECISIONS)}")
        if self.batch_size <= 0:
            raise SAEError(f"`batch_size={self.batch_size}` must be positive")
        if self.tokens < self.batch_size:
            raise SAEError(f"`tokens={self.tokens}` is less than one batch ({self.batch_size}); train on more tokens")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise SAEError(f"`lr` must be a positive number, got {self.lr}")
        if self.aux is None:
            self.aux = default_aux
        if self.aux not in AUX_LOSSES:
            raise SAEError(f"unknown aux loss `aux=\"{self.aux}\"`: choose one of {', '.join(AUX_LOSSES)}")
        self.rule.check(self)

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

    def shape(self) -> dict[str, Any]:
        """The settings a resumed run must share with its checkpoint, by name."""
        shared = {key: getattr(self, key) for key in SHAPE_KEYS}
        return {**shared, **{key: getattr(self.rule, key) for key in self.rule.shape_keys}}

    def to_dict(self) -> dict[str, Any]:
        """One flat dict: the shared settings, then the rule's."""
        shared = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "rule"}
        return {**shared, **{f.name: getattr(self.rule, f.name) for f in fields(self.rule)}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """The config of a to_dict dict. Keys that are neither TrainConfig's nor the rule's
        are dropped: a file written before rules had their own settings holds every rule's."""
        names = {f.name for f in fields(cls)} - {"rule"}
        if isinstance(data.get("arch"), str):
            names |= {f.name for f in fields(training_rule(data["arch"]).config)}
        return cls(**{k: v for k, v in data.items() if k in names})
