"""The Trainer with the fused TopK step (sae.fused_step): the same training as with the
autograd step (with and without AuxK), exact resume, checkpoints either step resumes (those
written before the step interface included), and which step `step` picks. Kernels run
under TRITON_INTERPRET=1 (slow: about a second a step at these shapes, mostly the top-k),
so runs are a few steps long.

Tolerance against the autograd Trainer: both run float32 on the CPU; the kernels sum in
another order than torch, a rounding difference of ~1e-7 relative per sum, and Adam's
normalised update turns a relative gradient error e into ~lr * e per step. After 4 steps
the weights differ by at most ~3e-7 here; the checks allow 10x that.

AUXK makes the auxiliary loss matter within those steps: features go dead after one batch
without firing (dead_tokens = the batch size), fewer of them than k_aux in some steps (the
fused step then takes them all), and aux_alpha is large enough that dropping the aux gradient
would move the weights by far more than the tolerance (checked).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from sae.config import TrainConfig
from sae.data import TensorSource
from sae.errors import SAEError
from sae.step_choice import resolve_step
from sae.trainer import Trainer

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
    base = dict(
        arch="topk",
        d_in=12,
        d_sae=20,
        k=3,
        tokens=8 * STEPS,
        batch_size=8,
        lr=1e-2,
        aux="none",
        init_tokens=96,
        seed=1,
        warmup_steps=2,
        decay_fraction=0.5,
        checkpoint_every=1000,
    )
    base.update(kw)
    return TrainConfig(**base)


AUXK = dict(aux="auxk", dead_tokens=8, k_aux=4, aux_alpha=0.5)


OLD_CHECKPOINTS = Path(__file__).parent / "checkpoints_before_step_interface"


def fused(cfg: TrainConfig, **kw) -> Trainer:
    return Trainer.start(cfg, source(), step="fused", backend="triton", **kw)


def source() -> TensorSource:
    return TensorSource(DATA, seed=1)


def run_steps(trainer: Trainer) -> list[dict[str, torch.Tensor | float]]:
    return [trainer.train_step(batch) for _, batch in zip(range(STEPS), source().batches(8))]


MUTUAL_CHOICE = dict(arch="mutual-choice", k=2)  # step 0 in the TopK start, steps 1-3 the batch budget
#: tied weights; targets from 0.5 (fires on 4 of a batch's 8 tokens at the start) and a bias
#: update after step 2, so steps 3-4 train at adapted thresholds
GBA = dict(arch="gba", k=None, aux="none", gba_p_max=0.5, gba_every=2)


@pytest.mark.parametrize("aux", [dict(aux="none"), AUXK, dict(MUTUAL_CHOICE, aux="none"), dict(MUTUAL_CHOICE, aux="aux-zipf", k_aux=4), GBA],
                         ids=["none", "auxk", "mutual-choice", "mutual-choice-aux-zipf", "gba"])
def test_fused_trainer_trains_like_the_autograd_trainer(aux):
    fast, plain = fused(config(**aux)), Trainer.start(config(**aux), source())
    assert (fast.step_kind, plain.step_kind) == ("fused", "autograd")
    got, want = run_steps(fast), run_steps(plain)
    for step, (g, w) in enumerate(zip(got, want)):
        assert g.keys() == w.keys()
        for key in w:
            torch.testing.assert_close(torch.as_tensor(g[key]).double(), torch.as_tensor(w[key]).double(), **TOLERANCE, msg=f"{key} at step {step}")
    for name, param in plain.model.named_parameters():
        torch.testing.assert_close(dict(fast.model.named_parameters())[name], param, **TOLERANCE, msg=name)
    assert torch.equal(fast.tokens_since_fired, plain.tokens_since_fired)
    torch.testing.assert_close(fast.density, plain.density, **TOLERANCE)
    for name, buffer in plain.model.rule.named_buffers():  # Mutual Choice's threshold and its count, GBA's
        torch.testing.assert_close(dict(fast.model.rule.named_buffers())[name], buffer, **TOLERANCE, msg=name)
    if aux.get("arch") == "mutual-choice":  # the batch budget gave some token more than k features
        assert plain.model.rule.topk_until == 1 and max(float(m["l0"]) for m in want[1:]) > 0
    if aux.get("arch") == "gba":  # the bias updates moved the thresholds from their start, and every code fired
        started = Trainer.start(config(**aux), source())
        started.train_step(next(source().batches(8)))
        assert not torch.equal(plain.model.rule.threshold, started.model.rule.threshold)
        assert all(float(m["l0"]) > 0 for m in want)
    if aux["aux"] == "auxk":
        assert all(float(m["aux"]) > 0 for m in want[1:]) and float(want[0]["aux"]) == 0  # nothing dead before step 1
        assert any(0 < float(m["dead_fraction"]) * 20 < 4 for m in want[:-1])  # a step with fewer dead than k_aux
        without = Trainer.start(config(aux="none"), source())
        run_steps(without)
        assert (without.model.W_dec - plain.model.W_dec).abs().max() > 100 * TOLERANCE["atol"]


def test_resumed_fused_run_ends_bit_for_bit_where_an_uninterrupted_one_does(tmp_path):
    cfg = config(tokens=8 * 2, **AUXK)  # nothing is dead before step 1: the resumed step has AuxK
    straight = fused(cfg, out=tmp_path / "a", command=["t"])
    straight.fit(progress=False)
    first = fused(cfg, out=tmp_path / "b", command=["t"])
    first.fit(until_step=1, progress=False)
    del first
    resumed = Trainer.resume(tmp_path / "b", source(), cfg, command=["t"], step="fused", backend="triton")
    assert resumed.step == 1
    resumed.fit(progress=False)

    a, b = straight.state(), resumed.state()
    assert a["step"] == b["step"] == 2
    assert float(a["history"][-1]["aux"]) > 0
    for name, tensor in a["model"].items():
        assert torch.equal(b["model"][name], tensor), name
    for i, moments in a["optimizer"]["state"].items():  # the fused step's Adam moments and count
        for key, tensor in moments.items():
            assert torch.equal(b["optimizer"]["state"][i][key], tensor), (i, key)
    assert float(a["optimizer"]["state"][0]["step"]) == 2
    assert torch.equal(b["density"], a["density"]) and torch.equal(b["tokens_since_fired"], a["tokens_since_fired"])
    assert [h["fvu"] for h in b["history"]] == [h["fvu"] for h in a["history"]]


@pytest.mark.parametrize("rule,trained", [({}, 4), (GBA, 1)], ids=["topk", "gba"])
def test_either_step_resumes_the_others_checkpoint(rule, trained, tmp_path):
    """Adam's state crosses over whole: moments (W_enc's transposed; GBA's tied matrix alone
    trains) and step count."""
    plain = Trainer.start(config(**rule), source(), out=tmp_path / "run", command=["t"])
    plain.fit(until_step=2, progress=False)
    fast = Trainer.resume(tmp_path / "run", source(), config(**rule), command=["t"], step="fused", backend="triton")
    saved, moved = plain.stepper.optimizer_state(), fast.stepper.optimizer_state()
    assert saved["state"].keys() == moved["state"].keys() == set(range(trained))
    for i, moments in saved["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(moved["state"][i][key], moments[key]), (i, key)
    assert float(fast.stepper.step_count) == 2
    fast.fit(until_step=3, progress=False)
    again = Trainer.resume(tmp_path / "run", source(), config(**rule), command=["t"])
    after = fast.state()
    for i, param in enumerate(again.stepper.optimizer.param_groups[0]["params"]):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(again.stepper.optimizer.state[param][key], after["optimizer"]["state"][i][key]), (i, key)
    again.fit(progress=False)  # torch's Adam steps on from the fused step's moments
    assert again.step == STEPS and float(again.stepper.optimizer.state[again.model.W_dec]["step"]) == STEPS


@pytest.mark.parametrize("kind", ["autograd", "fused"])
def test_checkpoints_written_before_the_step_interface_resume_where_their_run_ended(kind, tmp_path):
    """OLD_CHECKPOINTS holds, per step, the checkpoint the trainers before sae.step wrote after
    2 of 4 steps (the fused one with AuxK) and the state their uninterrupted run ended in:
    resumed here, each ends there on its own step within float32's last bits (the CPU's
    matrix kernels differ from one processor to another, so bits match only on the machine
    that wrote them), and within the kernels' rounding on the other step. The fused step's
    aux products have since been padded to aligned widths (sae.aux_capacity), which rounds
    their sums differently: its own checkpoint ends within rounding too
    (test_resumed_fused_run_ends_bit_for_bit_where_an_uninterrupted_one_does checks the
    exact resume on the current code and machine). AuxK has since left each token's own
    features out of its aux entries (SparseCode.outside), and in this short run features
    counted dead fire again, so the fused run's recorded end no longer holds: resumed
    on either step it ends where the other step ends, within the kernels' rounding."""
    want = torch.load(OLD_CHECKPOINTS / kind / "after_4_steps.pt", weights_only=True)
    for step, backend in (("autograd", None), ("fused", "triton")):
        shutil.copytree(OLD_CHECKPOINTS / kind, tmp_path / step)
        trainer = Trainer.resume(tmp_path / step, source(), command=["t"], step=step, backend=backend)
        assert trainer.step == 2
        trainer.fit(progress=False)
        got = trainer.state()
        if kind == "fused" and step == "autograd":  # AuxK's aux entries changed since (docstring)
            want = {"model": got["model"]}  # the fused step must end where the autograd step did
        elif step == kind == "autograd":  # the same step: float32's last bits
            for name, tensor in want["model"].items():
                torch.testing.assert_close(got["model"][name], tensor, rtol=1e-6, atol=1e-7, msg=name)
            for i, moments in want["optimizer"]["state"].items():
                for key, tensor in moments.items():
                    torch.testing.assert_close(got["optimizer"]["state"][i][key].cpu(), tensor.cpu(), rtol=1e-5, atol=1e-9,
                                               msg=f"{i} {key}")
            assert torch.equal(got["density"], want["density"]) and torch.equal(got["tokens_since_fired"], want["tokens_since_fired"])
        else:  # the other step: within the kernels' rounding
            for name, tensor in want["model"].items():
                torch.testing.assert_close(got["model"][name], tensor, **TOLERANCE, msg=name)


def test_auto_picks_the_fused_step_on_cuda_only_and_fused_says_why_not():
    assert resolve_step(config(device="cuda"), "auto", "triton") == "fused"
    assert resolve_step(config(), "auto", "torch") == "autograd"
    assert resolve_step(config(), "auto", "triton") == "autograd"  # the CPU runs Triton only in its interpreter
    assert resolve_step(config(device="cuda"), "autograd", "triton") == "autograd"
    assert resolve_step(config(), "fused", "triton") == "fused"  # under TRITON_INTERPRET=1, as here
    assert resolve_step(config(device="cuda", arch="gba", k=None), "auto", "triton") == "fused"
    assert resolve_step(config(device="cuda", aux="auxk"), "auto", "triton") == "fused"
    assert resolve_step(config(device="cuda", aux="aux-zipf"), "auto", "triton") == "fused"
    assert resolve_step(config(device="cuda", arch="mutual-choice"), "auto", "triton") == "fused"
    assert resolve_step(config(device="cuda", arch="matryoshka"), "auto", "triton") == "autograd"
    with pytest.raises(SAEError, match='`arch="gba"` only, not matryoshka'):
        resolve_step(config(device="cuda", arch="matryoshka"), "fused", "triton")
    with pytest.raises(SAEError, match='need `device="cuda"`'):
        resolve_step(config(), "fused", "torch")
    with pytest.raises(SAEError, match="unknown `step="):
        resolve_step(config(), "fast", "torch")
    with pytest.raises(SAEError, match='need `device="cuda"`'):  # the Trainer resolves the CPU's backend to torch
        Trainer.start(config(), source(), step="fused")
    with pytest.raises(SAEError, match="unknown `backend="):
        Trainer.start(config(), source(), backend="cuda")
