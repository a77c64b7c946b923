"""Adding a training rule is one module: a toy rule, defined and registered here and in no
library file, trains, checkpoints, saves and loads through the public API and `workbench
train`, with its own setting validated and spelled as a flag; and the registry's own checks."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import torch

from sae import registry
from sae.code import SparseCode, code_from_mask
from sae.config import TrainConfig
from sae.data import TensorSource
from sae.errors import SAEError
from sae.io import load_sae
from sae.registry import Architecture, RuleConfig, TrainingRule, register_architecture, register_rule
from sae.rules.base import SparsityRule
from sae.trainer import Trainer
from tests.app_stores import HOOK, dense_store
from tests.cli_process import run_in_process

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class FixedThresholdRule(SparsityRule):
    """f(z) = z where z > t_j (one fixed threshold per feature), saved as its own SAELens
    architecture with the thresholds as a tensor."""

    name = "toy"
    saelens_architecture = "toy-threshold"

    def __init__(self, threshold: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("threshold", threshold.detach().clone())

    def infer(self, z: torch.Tensor) -> SparseCode:
        return code_from_mask(z, z > self.threshold)

    def saelens_config(self) -> dict[str, Any]:
        return {"toy_rule": True}

    def saelens_tensors(self, d_sae: int) -> dict[str, torch.Tensor]:
        return {"toy_threshold": self.threshold.detach().clone()}


@dataclass
class ToyConfig(RuleConfig):
    toy_threshold: float = field(default=0.5, metadata={"help": "Pre-activation every feature must pass."})

    def check(self, run: TrainConfig) -> None:
        if not self.toy_threshold >= 0:
            raise SAEError(f"`toy_threshold={self.toy_threshold}` must be at least 0")


TOY = TrainingRule(
    name="toy", config=ToyConfig, default_aux="auxk", initial_density=lambda rule, run: 0.1,
    build=lambda settings, run: FixedThresholdRule(torch.full((run.d_sae,), settings.toy_threshold)),
)
TOY_ARCHITECTURE = Architecture(name="toy-threshold", load=lambda cfg, weights: FixedThresholdRule(weights["toy_threshold"]),
                                tensors=("toy_threshold",))


@pytest.fixture
def toy(monkeypatch):
    """The toy rule registered for one test (on copies of the tables, restored after it)."""
    registry.rule_names()  # the built-in rules first
    monkeypatch.setattr(registry, "RULES", dict(registry.RULES))
    monkeypatch.setattr(registry, "ARCHITECTURES", dict(registry.ARCHITECTURES))
    register_rule(TOY)
    register_architecture(TOY_ARCHITECTURE)


def data() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    codes = torch.rand(512, 24, generator=gen) * (torch.rand(512, 24, generator=gen) < 0.15)
    return codes @ torch.randn(24, 12, generator=gen)


def test_a_registered_rule_trains_resumes_saves_and_loads(toy, tmp_path):
    x = data()
    config = TrainConfig(arch="toy", d_in=12, d_sae=48, tokens=128 * 12, batch_size=128, lr=1e-2, init_tokens=256,
                         dead_tokens=256, checkpoint_every=1000, toy_threshold=0.2, k=None)
    assert config.rule == ToyConfig(toy_threshold=0.2) and config.aux == "auxk"
    trainer = Trainer.start(config, TensorSource(x, seed=1), tmp_path / "run", command=["test"])
    trainer.fit(until_step=6, progress=False)
    resumed = Trainer.resume(tmp_path / "run", TensorSource(x, seed=1))
    assert resumed.config == config and resumed.step == 6
    resumed.fit(progress=False)
    assert resumed.history[-1]["fvu"] < 0.9 * resumed.history[0]["fvu"]
    model, cfg = load_sae(tmp_path / "run")
    assert cfg["architecture"] == "toy-threshold" and cfg["toy_rule"] is True
    assert isinstance(model.rule, FixedThresholdRule) and torch.equal(model.rule.threshold, torch.full((48,), 0.2))
    # the saved SAE takes raw activations and fires where the trained one does
    trained = resumed.model.eval()
    torch.testing.assert_close(model.feature_acts(x[:64]), trained.feature_acts(x[:64] * resumed.input_scale), atol=1e-4, rtol=1e-4)
    assert (model.feature_acts(x[:64]) > 0).any()


def test_a_registered_rules_settings_are_validated_and_kept_apart(toy):
    base = dict(d_in=12, d_sae=48, tokens=256, batch_size=128)
    with pytest.raises(SAEError, match="`toy_threshold=-1` must be at least 0"):
        TrainConfig(arch="toy", toy_threshold=-1, **base)
    assert TrainConfig(arch="topk", k=4, toy_threshold=0.3, **base).rule == registry.RULES["topk"].config(k=4)
    with pytest.raises(SAEError, match="unknown setting `toy_treshold`"):
        TrainConfig(arch="toy", toy_treshold=0.3, **base)
    names = registry.rule_names()  # the built-in ones first, then the other modules of sae.rules, then this test's
    assert names[:3] == ("topk", "mutual-choice", "gba") and "feature-choice" in names and names[-1] == "toy"
    with pytest.raises(SAEError, match=f"unknown `arch=\"toys\"`: choose one of {', '.join(names)}$"):
        TrainConfig(arch="toys", **base)


def test_workbench_train_takes_a_registered_rule_and_its_flag(toy, tmp_path, monkeypatch, capsys):
    store = dense_store(tmp_path / "store", tokens=800)
    common = ["train", "--store", str(store.root), "--hook", HOOK, "--d-sae", "64", "--tokens", "768", "--batch-size", "128",
              "--no-progress"]
    code, err = run_in_process(monkeypatch, capsys, *common, "--arch", "toy", "--toy-threshold", "0.1", "--out", str(tmp_path / "sae"))
    assert code == 0, err
    model, _ = load_sae(tmp_path / "sae")
    assert torch.equal(model.rule.threshold, torch.full((64,), 0.1))
    code, err = run_in_process(monkeypatch, capsys, *common, "--arch", "toy", "--toy-threshold", "-1", "--out", str(tmp_path / "x"))
    assert code == 2 and err == "error: --toy-threshold -1.0 must be at least 0\n"
    code, err = run_in_process(monkeypatch, capsys, *common, "--arch", "topk", "--toy-threshold", "0.1", "--out", str(tmp_path / "x"))
    assert code == 2 and err == "error: --toy-threshold does not apply to --arch topk (its own flags: --k)\n"
    assert not (tmp_path / "x").exists()


@dataclass
class ClashingConfig(RuleConfig):
    lr: float = 1.0


@pytest.mark.parametrize(("change", "words"), [
    (dict(name="topk"), "'topk' is already registered"),
    (dict(name="toy2", default_aux="l1"), "default_aux 'l1' is not one of"),
    (dict(name="toy2", steps=("fused",)), "must include 'autograd'"),
    (dict(name="toy2", config=ClashingConfig), "settings lr are TrainConfig's own"),
])
def test_the_registry_refuses_a_rule_it_cannot_run(toy, change, words):
    with pytest.raises(ValueError, match=words):
        register_rule(replace(TOY, **change))
    assert "toy2" not in registry.rule_names()
