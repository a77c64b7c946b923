"""FusedTopKTrainer (sae.fused_trainer): the same training as the autograd Trainer, exact
resume, and when `--step` picks which. Kernels run under TRITON_INTERPRET=1 (slow: about
half a second a step at these shapes, mostly the top-k), so runs are a few steps long.

Tolerance against the autograd Trainer: both run float32 on the CPU; the kernels sum in
another order than torch, a rounding difference of ~1e-7 relative per sum, and Adam's
normalised update turns a relative gradient error e into ~lr * e per step. After 4 steps
the weights differ by at most ~3e-7 here; the checks allow 10x that.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from sae.config import TrainConfig  # noqa: E402
from sae.data import TensorSource  # noqa: E402
from sae.fused_trainer import FusedTopKTrainer, choose_trainer  # noqa: E402
from sae.trainer import Trainer  # noqa: E402
from workbench.errors import WorkbenchError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 4
TOLERANCE = dict(rtol=1e-5, atol=3e-6)


def make_data() -> torch.Tensor:
    """Sparse combinations of 30 directions in 12 dimensions, plus noise."""
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(30, 12, generator=gen)
    codes = torch.rand(400, 30, generator=gen) * (torch.rand(400, 30, generator=gen) < 0.15)
    return codes @ V + 0.05 * torch.randn(400, 12, generator=gen)


DATA = make_data()


def config(**kw) -> TrainConfig:
    """Tiny shapes, none a block multiple; warm-up and decay so the lr changes every step."""
    base = dict(arch="topk", d_in=12, d_sae=20, k=3, tokens=8 * STEPS, batch_size=8, lr=1e-2, aux="none", init_tokens=96,
                seed=1, warmup_steps=2, decay_fraction=0.5, checkpoint_every=1000)
    base.update(kw)
    return TrainConfig(**base)


def source() -> TensorSource:
    return TensorSource(DATA, seed=1)


def test_fused_trainer_trains_like_the_autograd_trainer():
    fused, plain = FusedTopKTrainer.start(config(), source()), Trainer.start(config(), source())
    for _, batch in zip(range(STEPS), source().batches(8)):
        got, want = fused.train_step(batch), plain.train_step(batch)
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(torch.as_tensor(got[key]).double(), torch.as_tensor(want[key]).double(), **TOLERANCE, msg=key)
    for name, param in plain.model.named_parameters():
        torch.testing.assert_close(dict(fused.model.named_parameters())[name], param, **TOLERANCE, msg=name)
    assert torch.equal(fused.tokens_since_fired, plain.tokens_since_fired)
    torch.testing.assert_close(fused.density, plain.density, **TOLERANCE)


def test_resumed_fused_run_ends_bit_for_bit_where_an_uninterrupted_one_does(tmp_path):
    straight = FusedTopKTrainer.start(config(), source(), out=tmp_path / "a", command=["t"])
    straight.fit(progress=False)
    first = FusedTopKTrainer.start(config(), source(), out=tmp_path / "b", command=["t"])
    first.fit(until_step=2, progress=False)
    del first
    resumed = FusedTopKTrainer.resume(tmp_path / "b", source(), config(), command=["t"])
    assert resumed.step == 2
    resumed.fit(progress=False)

    a, b = straight.state(), resumed.state()
    assert a["step"] == b["step"] == STEPS
    for name, tensor in a["model"].items():
        assert torch.equal(b["model"][name], tensor), name
    for i, moments in a["optimizer"]["state"].items():  # the fused step's Adam moments and count
        for key, tensor in moments.items():
            assert torch.equal(b["optimizer"]["state"][i][key], tensor), (i, key)
    assert float(a["optimizer"]["state"][0]["step"]) == STEPS
    assert torch.equal(b["density"], a["density"]) and torch.equal(b["tokens_since_fired"], a["tokens_since_fired"])
    assert [h["fvu"] for h in b["history"]] == [h["fvu"] for h in a["history"]]


def test_auto_picks_the_fused_step_on_cuda_only_and_fused_says_why_not(monkeypatch):
    assert choose_trainer(config(device="cuda")) is FusedTopKTrainer
    assert choose_trainer(config()) is Trainer  # the CPU runs Triton only in its interpreter
    assert choose_trainer(config(device="cuda"), "autograd") is Trainer
    assert choose_trainer(config(), "fused") is FusedTopKTrainer  # under TRITON_INTERPRET=1, as here
    assert choose_trainer(config(device="cuda", arch="gba", k=None)) is Trainer
    with pytest.raises(WorkbenchError, match="--arch topk only, not mutual-choice"):
        choose_trainer(config(device="cuda", arch="mutual-choice", aux="none"), "fused")
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun: data-parallel training is autograd
    assert choose_trainer(config(device="cuda")) is Trainer
    with pytest.raises(WorkbenchError, match="one process"):
        choose_trainer(config(device="cuda"), "fused")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(WorkbenchError, match="need --device cuda"):
        choose_trainer(config(), "fused")
