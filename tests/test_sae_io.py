"""SAELens interchange: what we write loads in sae_lens.SAE.load_from_disk and gives the same
feature activations and reconstructions as ours; SAELens-format folders load into ours."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from sae.config import TrainConfig
from sae.data import TensorSource
from sae.errors import SAEError
from sae.io import load_sae, save_sae
from sae.model import SparseAutoencoder
from sae.rules import TopKRule
from sae.synthetic import SyntheticFeatures
from sae.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def raw_data():
    """Synthetic activations far from unit scale and centred off zero, so the folded input
    normalisation and b_dec matter."""
    feats = SyntheticFeatures.make(n=64, d=16, mean_active=3, seed=0)
    x, _ = feats.sample(6000, torch.Generator().manual_seed(1))
    return x * 37.0 + 5.0


def saelens_load(folder):
    from sae_lens import SAE

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SAE.load_from_disk(str(folder))


@pytest.mark.parametrize(("arch", "k", "architecture"), [("topk", 4, "topk"), ("mutual-choice", 4, "jumprelu"), ("gba", None, "jumprelu")])
def test_trained_sae_round_trips_through_saelens(tmp_path, raw_data, arch, k, architecture):
    config = TrainConfig(arch=arch, d_in=16, d_sae=48, k=k, tokens=256 * 40, batch_size=256, lr=3e-3, gba_every=4, init_tokens=2048)
    trainer = Trainer.start(config, TensorSource(raw_data[:4000]), out=tmp_path / "run", command=["test"])
    trainer.fit(progress=False)
    folder = tmp_path / "run"
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == architecture and cfg["d_in"] == 16 and cfg["d_sae"] == 48
    assert trainer.input_scale != pytest.approx(1.0, rel=0.1)

    x = raw_data[4000:]
    theirs = saelens_load(folder)
    assert theirs.cfg.architecture() == architecture
    ours, _ = load_sae(folder)
    with torch.no_grad():
        acts_theirs = theirs.encode(x)
        acts_ours = ours.feature_acts(x)
        # the in-memory trained model, fed normalised inputs, agrees with the folded file
        acts_trained = trainer.model.feature_acts(x * trainer.input_scale)
        torch.testing.assert_close(acts_ours, acts_theirs, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(acts_ours, acts_trained, rtol=1e-4, atol=1e-4)
        assert float((acts_ours > 0).float().sum(1).mean()) > 0
        torch.testing.assert_close(ours.reconstruct(x), theirs.decode(acts_theirs), rtol=1e-4, atol=1e-3)
    if arch == "mutual-choice":
        assert float(theirs.threshold.detach().min()) == pytest.approx(float(trainer.model.rule.theta))
    if arch == "gba":
        torch.testing.assert_close(theirs.threshold.detach(), trainer.model.rule.threshold)  # minus the adapted biases
        assert float(theirs.threshold.detach().min()) >= 0.0 and float(theirs.threshold.detach().max()) <= 1.0


def test_saelens_written_folder_loads_into_ours(tmp_path):
    from sae_lens import SAE
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = TopKSAE(TopKSAEConfig(d_in=12, d_sae=40, k=3, apply_b_dec_to_input=False))
        with torch.no_grad():
            for p in theirs.parameters():
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
        theirs.save_model(tmp_path / "peer")
        assert isinstance(SAE.load_from_disk(str(tmp_path / "peer")), TopKSAE)
    ours, cfg = load_sae(tmp_path / "peer")
    x = torch.randn(100, 12, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(ours.feature_acts(x), theirs.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.reconstruct(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_loading_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(SAEError, match="not an SAE folder"):
        load_sae(tmp_path)
    model = SparseAutoencoder(4, 8, TopKRule(2))
    model.init_weights(torch.Generator().manual_seed(0))
    folder = save_sae(tmp_path / "x", model)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["architecture"] = "gated"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEError, match="gated"):
        load_sae(folder)
