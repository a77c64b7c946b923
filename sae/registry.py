"""The registry of sparsifying rules: what the library knows about each rule, registered by
the rule's own module, so the config, the trainer, saving and loading and the command line
read one table instead of naming rules.

Two tables:
- training rules (TrainingRule), by the name TrainConfig's `arch` takes: the rule's own
  settings (a RuleConfig dataclass), how a run builds the rule, its default auxiliary loss,
  and which training steps can train it;
- SAELens architectures (Architecture), by cfg.json's "architecture": the tensors its
  weights file holds beyond W_enc, b_enc, W_dec, b_dec, and how a folder becomes our
  inference rule. What a rule saves is the rule's own (SparsityRule.saelens_architecture,
  saelens_config, saelens_tensors), so a training rule names the architecture it saves as.

The built-in rules (sae/rules/) register when sae.rules is imported, which every lookup
does first. A new rule is one module: its SparsityRule, its RuleConfig, a register_rule
call (and register_architecture if it saves in a form not registered yet).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import Field, dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

from sae.errors import SAEError

if TYPE_CHECKING:
    import torch

    from sae.config import TrainConfig
    from sae.rules.base import SparsityRule

#: Auxiliary losses the trainer computes (sae.trainer.Trainer.aux_weights).
AUX_LOSSES = ("auxk", "aux-zipf", "none")
#: Step implementations: sae.autograd_step's (every rule) and sae.fused_step's.
STEP_KINDS = ("autograd", "fused")


@dataclass
class RuleConfig:
    """A rule's own settings, one dataclass field each. A field's name is the keyword
    TrainConfig takes for it, its key in training.json and checkpoints, and (as --name-with-
    dashes) its `workbench train` flag, so names must not be TrainConfig's own and should
    carry the rule's prefix unless rules share the setting (k); metadata["help"] is the
    flag's help. None as a value means "not given" (check may fill it in)."""

    #: Settings a resumed run must share with its checkpoint (beside sae.config.SHAPE_KEYS).
    shape_keys: ClassVar[tuple[str, ...]] = ()

    def check(self, run: TrainConfig) -> None:
        """Refuse settings that cannot train run (an SAEError naming the parameter, `name`)
        and fill defaults that depend on the run (e.g. a period counted from batch_size)."""


@dataclass(frozen=True)
class TrainingRule:
    """A rule TrainConfig(arch=name) trains."""

    name: str
    #: The rule's settings; TrainConfig.rule holds an instance.
    config: type[RuleConfig]
    #: (the rule's settings, the run) -> the SparsityRule the SAE trains with.
    build: Callable[[Any, TrainConfig], SparsityRule]
    #: The auxiliary loss a run uses when it names none (one of AUX_LOSSES).
    default_aux: str
    #: (the built rule, the run) -> the fraction of features expected to fire per token,
    #: where the per-feature density estimate starts (aux-zipf reads it from the first step).
    initial_density: Callable[[SparsityRule, TrainConfig], float]
    #: Which of STEP_KINDS can train it ("autograd" always).
    steps: tuple[str, ...] = ("autograd",)
    #: Whether sae.distributed can train it: its selection is per token, so no batch
    #: statistic needs a global treatment across processes.
    data_parallel: bool = False
    #: Settings that give the rule its sparsity in a run of a few hundred steps (`workbench
    #: demo`'s), e.g. {"k": 16}.
    short_run_settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Architecture:
    """A SAELens architecture sae.io loads."""

    name: str
    #: (cfg.json, the weights as float32 tensors) -> the inference rule. It may rewrite the
    #: weights it is given into the plain form z = (x - b_dec) W_enc + b_enc (TopK's
    #: rescale_acts_by_decoder_norm); b_enc is there, already adjusted for apply_b_dec_to_input.
    load: Callable[[dict[str, Any], dict[str, torch.Tensor]], SparsityRule]
    #: Tensors of shape [d_sae] the weights file must hold beside W_enc, b_enc, W_dec, b_dec.
    tensors: tuple[str, ...] = ()


RULES: dict[str, TrainingRule] = {}
ARCHITECTURES: dict[str, Architecture] = {}


def _builtins() -> None:
    import sae.rules  # noqa: F401  (its modules register the built-in rules)


def register_rule(rule: TrainingRule) -> TrainingRule:
    """Add a training rule; returns it. Raises ValueError on a name taken, an unknown aux
    loss or step, or a setting named like one of TrainConfig's own."""
    from sae.config import TrainConfig

    if rule.name in RULES:
        raise ValueError(f"a training rule named {rule.name!r} is already registered")
    if rule.default_aux not in AUX_LOSSES:
        raise ValueError(f"rule {rule.name!r}: default_aux {rule.default_aux!r} is not one of {', '.join(AUX_LOSSES)}")
    if "autograd" not in rule.steps or not set(rule.steps) <= set(STEP_KINDS):
        raise ValueError(f"rule {rule.name!r}: steps {rule.steps} must include 'autograd' and be among {', '.join(STEP_KINDS)}")
    clash = {f.name for f in fields(rule.config)} & {f.name for f in fields(TrainConfig)}
    if clash:
        raise ValueError(f"rule {rule.name!r}: settings {', '.join(sorted(clash))} are TrainConfig's own; rename them")
    RULES[rule.name] = rule
    return rule


def register_architecture(architecture: Architecture) -> Architecture:
    """Add a SAELens architecture sae.io can load; returns it."""
    if architecture.name in ARCHITECTURES:
        raise ValueError(f"a SAELens architecture named {architecture.name!r} is already registered")
    ARCHITECTURES[architecture.name] = architecture
    return architecture


def rule_names() -> tuple[str, ...]:
    """The names `arch` takes, in registration order."""
    _builtins()
    return tuple(RULES)


def training_rule(arch: str) -> TrainingRule:
    """The registered rule `arch` names, or an SAEError listing the ones there are."""
    _builtins()
    if arch not in RULES:
        raise SAEError(f"unknown `arch=\"{arch}\"`: choose one of {', '.join(RULES)}")
    return RULES[arch]


def rule_settings() -> dict[str, list[tuple[TrainingRule, Field]]]:
    """Every registered rule's settings by name: (rule, its dataclass field) for each rule
    that has it (k: topk and mutual-choice)."""
    _builtins()
    table: dict[str, list[tuple[TrainingRule, Field]]] = {}
    for rule in RULES.values():
        for f in fields(rule.config):
            table.setdefault(f.name, []).append((rule, f))
    return table


def architecture(cfg: dict[str, Any]) -> Architecture:
    """The registered architecture of a SAELens cfg.json ("standard" when it names none)."""
    _builtins()
    name = cfg.get("architecture", "standard")
    if name not in ARCHITECTURES:
        raise SAEError(f"SAE architecture '{name}' is not supported here ({', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[name]
