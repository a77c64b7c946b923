"""The trainer: exact resume, the NaN/Inf guard, decoder rows on the unit sphere, learning
on synthetic data, and the shuffled chunk stream (deterministic, seekable, a permutation)."""

from __future__ import annotations

import pytest
import torch

from sae.config import TrainConfig
from sae.data import ChunkedShuffleStream, TensorSource
from sae.errors import SAEError
from sae.synthetic import SyntheticFeatures, SyntheticSource, recovery
from sae.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


FEATS = SyntheticFeatures.make(n=64, d=16, mean_active=3, kind="zipf", seed=0)


def config(arch: str, **kw) -> TrainConfig:
    base = dict(arch=arch, d_in=16, d_sae=64, k=None if arch == "gba" else 4, tokens=128 * 60, batch_size=128,
                lr=3e-3, dead_tokens=1000, gba_every=7, checkpoint_every=1000, init_tokens=1024)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("arch", ["topk", "mutual-choice", "gba"])
def test_resume_matches_an_uninterrupted_run(tmp_path, arch):
    straight = Trainer.start(config(arch), SyntheticSource(FEATS, seed=1), out=tmp_path / "a", command=["t"])
    straight.fit(progress=False)

    first = Trainer.start(config(arch), SyntheticSource(FEATS, seed=1), out=tmp_path / "b", command=["t"])
    first.fit(until_step=23, progress=False)  # interrupted; its checkpoint is on disk
    assert (tmp_path / "b" / "checkpoint.pt").exists() and not (tmp_path / "b" / "cfg.json").exists()
    del first
    resumed = Trainer.resume(tmp_path / "b", SyntheticSource(FEATS, seed=1), config(arch), command=["t"])
    assert resumed.step == 23
    resumed.fit(progress=False)

    a, b = straight.state(), resumed.state()
    assert a["step"] == b["step"] == 60
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(b["density"], a["density"], rtol=0, atol=0)
    assert torch.equal(b["tokens_since_fired"], a["tokens_since_fired"])
    assert [h["fvu"] for h in b["history"]] == [h["fvu"] for h in a["history"]]
    assert (tmp_path / "b" / "cfg.json").exists()


def test_resume_refuses_a_different_width(tmp_path):
    Trainer.start(config("topk"), SyntheticSource(FEATS), out=tmp_path / "run").fit(until_step=3, progress=False)
    with pytest.raises(SAEError, match="d_sae=64 \\(checkpoint\\) vs 96"):
        Trainer.resume(tmp_path / "run", SyntheticSource(FEATS), config("topk", d_sae=96))
    with pytest.raises(SAEError, match="continue it with `resume`"):
        Trainer.start(config("topk"), SyntheticSource(FEATS), out=tmp_path / "run")


def test_nan_in_the_data_stops_with_one_clear_error_and_keeps_the_checkpoint(tmp_path):
    data = torch.randn(4000, 16)
    data[3000, 5] = float("nan")
    trainer = Trainer.start(config("topk", tokens=4000 * 2, checkpoint_every=5), TensorSource(data), out=tmp_path / "run")
    with pytest.raises(SAEError, match="NaN or Inf"):
        trainer.fit(progress=False)
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["step"] >= 5


def test_decoder_rows_stay_unit_norm_and_training_recovers_features():
    trainer = Trainer.start(config("topk", tokens=256 * 300, batch_size=256), SyntheticSource(FEATS, seed=3))
    model = trainer.fit(progress=False)
    torch.testing.assert_close(model.W_dec.norm(dim=1), torch.ones(64), rtol=0, atol=1e-5)
    assert trainer.history[-1]["fvu"] < 0.5 * trainer.history[0]["fvu"]
    assert recovery(model.W_dec.detach(), FEATS.V)["mean_cos"] > 0.6


@pytest.mark.parametrize("arch", ["topk", "mutual-choice", "matryoshka", "feature-choice"])
def test_encoder_starts_at_the_scale_that_best_reconstructs_the_init_sample(arch):
    """For the rules whose selection ignores a common scale of z: W_enc = c W_dec^T with c the
    least-squares scale of the first reconstruction (through the training selection): the unit
    transpose (c = 1) overshoots, and any other c reconstructs the init tokens worse."""
    source = SyntheticSource(FEATS, seed=3)
    trainer = Trainer.start(config(arch), source)
    model = trainer.model
    assert model.rule.scale_free_selection
    x = torch.cat([batch for _, batch in zip(range(8), source.batches(128))]) * trainer.input_scale  # the init sample

    def fvu_at(factor: float) -> float:
        with torch.no_grad():
            saved = model.W_enc.clone()
            model.W_enc.mul_(factor)
            x_hat = model.output(x, model.rule.select(model.pre_acts(x)))
            model.W_enc.copy_(saved)
        return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())

    start = fvu_at(1.0)
    assert start < fvu_at(0.95) and start < fvu_at(1.05)
    with torch.no_grad():
        unit = float(model.W_dec.norm(dim=1).mean() / model.W_enc.norm(dim=0).mean())  # back to W_enc = W_dec^T
    assert unit > 1.05 and fvu_at(unit) > start


def test_bad_settings_are_refused_with_one_line():
    with pytest.raises(SAEError, match="`k=100` must be between 1 and d_sae=64"):
        config("topk", k=100)
    with pytest.raises(SAEError, match="needs `k`"):
        config("mutual-choice", k=None)
    with pytest.raises(SAEError, match="unknown `arch="):
        config("gated")
    with pytest.raises(SAEError, match="width 16 but the SAE expects d_in=8"):
        Trainer.start(config("topk", d_in=8), SyntheticSource(FEATS))


def test_chunk_stream_is_a_seekable_permutation_per_epoch():
    data = torch.arange(1000, dtype=torch.float32)[:, None]
    sizes = [100] * 9 + [100]
    loads: list[list[int]] = []

    def load(chunks):
        loads.append(chunks)
        return torch.cat([data[c * 100 : (c + 1) * 100] for c in chunks])

    stream = ChunkedShuffleStream(sizes, load, buffer_chunks=3, seed=7)
    batches = [b for _, b in zip(range(20), stream.batches(64))]
    epoch = torch.cat(batches)[:1000, 0]
    assert sorted(epoch.tolist()) == list(range(1000))  # every token once per epoch
    assert not torch.equal(epoch, torch.arange(1000.0))  # shuffled
    assert max(len(c) for c in loads) <= 3  # never more than one buffer in memory
    again = [b for _, b in zip(range(20), ChunkedShuffleStream(sizes, load, 3, seed=7).batches(64))]
    assert all(torch.equal(x, y) for x, y in zip(batches, again))
    seek = [b for _, b in zip(range(7), ChunkedShuffleStream(sizes, load, 3, seed=7).batches(64, start_batch=13))]
    assert all(torch.equal(x, y) for x, y in zip(batches[13:], seek))
