"""Feature Choice and the batch rules' inference thresholds: each feature keeps its top m =
k*B/d_sae tokens (the budget exactly k*B when d_sae does not divide it); the thresholds,
calibrated on the run's last steps, give a held-out mean L0 within 5% of k for Mutual Choice
and Feature Choice; `workbench train --arch feature-choice` trains one that SAELens loads."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from sae.config import TrainConfig
from sae.io import load_sae
from sae.registry import rule_names
from sae.rules.feature_choice import FeatureChoiceRule
from sae.synthetic import SyntheticFeatures, SyntheticSource
from sae.trainer import Trainer
from tests.app_stores import HOOK, dense_store
from tests.cli_process import run_workbench

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_each_feature_keeps_its_top_m_tokens():
    z = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    z[:, 5] = -1.0 - torch.rand(64)  # a feature with no positive entry keeps nothing
    rule = FeatureChoiceRule(k=4, d_sae=32)  # m = 4 * 64 / 32 = 8
    code = rule(z)
    counts = code.fired(32)
    assert int(counts[5]) == 0 and torch.all(counts[torch.arange(32) != 5] == 8), counts
    kept = code.to_dense(32)
    top = torch.zeros_like(z, dtype=torch.bool).scatter_(0, z.topk(8, dim=0).indices, True) & (z > 0)
    assert torch.equal(kept > 0, top) and torch.equal(kept[top], z[top])
    assert code.width == int(top.sum(1).max())  # rows as wide as the fullest one
    rule.after_step(None, 0)  # each threshold: halfway between the feature's 8th and 9th largest values
    ninth = z.topk(9, dim=0).values
    torch.testing.assert_close(rule.theta, ((ninth[7] + ninth[8]) / 2).clamp(min=0))


def test_the_budget_is_exactly_k_times_the_batch_when_d_sae_does_not_divide_it():
    z = torch.rand(50, 32, generator=torch.Generator().manual_seed(1)) + 0.1  # all positive
    code = FeatureChoiceRule(k=4, d_sae=32)(z)  # 200 = 6 * 32 + 8: eight features take a 7th token
    counts = code.fired(32)
    assert int(counts.sum()) == 200 and int((counts == 7).sum()) == 8 and int((counts == 6).sum()) == 24
    seventh = z.topk(7, dim=0).values[-1]
    assert set(torch.nonzero(counts == 7).flatten().tolist()) == set(seventh.topk(8).indices.tolist())


@pytest.mark.parametrize("arch", ["mutual-choice", "feature-choice"])
def test_the_calibrated_threshold_gives_k_on_held_out_data(arch):
    """The batch rules' inference form keeps k features per token on average on data the run
    never saw (EMA of the per-batch estimate alone: 20% under k on the demo store)."""
    feats = SyntheticFeatures.make(n=96, d=24, mean_active=4, kind="zipf", seed=3)
    config = TrainConfig(arch=arch, d_in=24, d_sae=128, k=4, tokens=256 * 200, batch_size=256, lr=2e-3, seed=0, aux="none")
    trainer = Trainer.start(config, SyntheticSource(feats, seed=4))
    model = trainer.fit(progress=False)
    x = next(SyntheticSource(feats, seed=99).batches(8192)) * trainer.input_scale
    with torch.no_grad():
        l0 = float(model.encode(x).l0().float().mean())
    assert abs(l0 - 4) <= 0.05 * 4, l0
    assert float(model.rule.theta.min()) > 0


def test_registry_lists_feature_choice_and_the_cli_trains_it_for_saelens(tmp_path):
    assert "feature-choice" in rule_names()
    store = dense_store(tmp_path / "store", tokens=1200)
    out = tmp_path / "sae"
    done = run_workbench("train", "--store", str(store.root), "--hook", HOOK, "--arch", "feature-choice", "--k", "4",
                         "--d-sae", "64", "--tokens", "2560", "--batch-size", "256", "--no-progress", "--out", str(out))
    assert done.returncode == 0, done.stderr
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["metadata"]["workbench"]["arch"] == "feature-choice"
    ours, _ = load_sae(out)
    from sae_lens import SAE

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = SAE.load_from_disk(str(out))
    x = torch.randn(200, 32, generator=torch.Generator().manual_seed(2)) * 3
    with torch.no_grad():
        torch.testing.assert_close(ours.feature_acts(x), theirs.encode(x), rtol=1e-4, atol=1e-4)
    assert len(set(ours.rule.threshold.tolist())) > 1  # one threshold per feature
    code = run_workbench("train", "--store", str(store.root), "--hook", HOOK, "--arch", "feature-choice", "--k", "4",
                         "--d-sae", "4096", "--tokens", "512", "--batch-size", "256", "--no-progress", "--out", str(tmp_path / "x"))
    assert code.returncode == 2 and code.stderr.endswith("raise --batch-size or --k\n"), code.stderr
