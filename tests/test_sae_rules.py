"""Each rule's invariant: TopK keeps at most k per row; Mutual Choice keeps k*B per batch and
its learned threshold reproduces that budget at inference; GBA keeps its biases in [-1, 0]
and moves each group's firing frequency toward its target."""

from __future__ import annotations

import pytest
import torch

from sae.config import TrainConfig
from sae.rules import GBARule, MutualChoiceRule, TopKRule
from sae.synthetic import SyntheticFeatures, SyntheticSource
from sae.trainer import Trainer


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_topk_keeps_at_most_k_per_row_and_they_are_the_largest():
    z = torch.randn(64, 200, generator=torch.Generator().manual_seed(0))
    z[0] = -1.0  # a row with nothing positive keeps nothing
    code = TopKRule(7)(z)
    assert code.width == 7
    l0 = code.l0()
    assert int(l0.max()) <= 7 and int(l0[0]) == 0 and int(l0[1:].min()) == 7
    dense = code.to_dense(200)
    kth = z.topk(7, dim=1).values[:, -1:]
    assert torch.equal(dense[1:] > 0, (z[1:] >= kth[1:]) & (z[1:] > 0))


def test_mutual_choice_keeps_k_times_batch_and_allocates_unevenly():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(32, 300, generator=g)
    z[:4] += 2.0  # "hard" tokens with large pre-activations take more of the budget
    rule = MutualChoiceRule(k=5)
    code = rule(z)
    assert int(code.l0().sum()) == 5 * 32
    kept = code.to_dense(300)
    assert torch.equal(kept > 0, z >= z.flatten().topk(160).values.min())
    assert code.l0()[:4].float().mean() > 5 > code.l0()[4:].float().mean()
    assert float(rule.theta) == float(z.flatten().topk(160).values.min())


def test_mutual_choice_threshold_reproduces_the_budget_at_inference():
    feats = SyntheticFeatures.make(n=96, d=24, mean_active=3, kind="zipf", seed=3)
    config = TrainConfig(arch="mutual-choice", d_in=24, d_sae=128, k=4, tokens=256 * 250, batch_size=256, lr=2e-3, seed=0,
                         theta_decay=0.9)  # a short EMA memory for a 250-step run
    trainer = Trainer.start(config, SyntheticSource(feats, seed=4))
    model = trainer.fit(progress=False)
    x = next(SyntheticSource(feats, seed=99).batches(4096)) * trainer.input_scale
    with torch.no_grad():
        train_l0 = model.rule.eval()(model.pre_acts(x)).l0().float().mean()
        infer_l0 = model.encode(x).l0().float().mean()
    assert float(train_l0) == 4.0
    assert abs(float(infer_l0) - 4.0) < 0.4, float(infer_l0)
    assert float(model.rule.theta) > 0


def test_gba_biases_stay_in_range_and_group_frequencies_approach_targets():
    feats = SyntheticFeatures.make(n=96, d=24, mean_active=3, kind="zipf", seed=5)
    config = TrainConfig(
        arch="gba", d_in=24, d_sae=120, tokens=512 * 300, batch_size=512, lr=2e-3, gba_groups=3,
        gba_p_max=0.2, gba_p_min=0.01, gba_every=5, gba_gamma=0.05, seed=0,
    )
    trainer = Trainer.start(config, SyntheticSource(feats, seed=6))
    rule: GBARule = trainer.model.rule
    x = next(SyntheticSource(feats, seed=77).batches(8192)) * trainer.input_scale

    def group_freqs() -> torch.Tensor:
        with torch.no_grad():
            fired = (trainer.model.pre_acts(x) > rule.threshold).float().mean(0)
        return torch.stack([fired[rule.group == g].mean() for g in range(3)])

    before = group_freqs()
    model = trainer.fit(progress=False)
    after = group_freqs()
    assert float(rule.bias.min()) >= -1.0 and float(rule.bias.max()) <= 0.0
    assert float(rule.bias.min()) < 0  # the rule did move the biases
    assert not model.b_enc.requires_grad and not model.b_dec.requires_grad
    assert model.W_enc is None  # tied: the encoder is the decoder's unit directions
    targets = rule.group_target
    err_before = (before.log() - targets.log()).abs()
    err_after = (after.log() - targets.log()).abs()
    assert torch.all(err_after < err_before), (before, after, targets)
    assert after[0] > after[1] > after[2]  # the groups end ordered like their targets


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("arch", ["topk", "mutual-choice", "gba"])
def test_every_rule_trains_under_bf16_autocast(arch, backend):
    """The default precision on CUDA (bf16 encoder product under autocast), run through CPU's
    autocast, which casts matmuls as CUDA's does: each rule with its default aux loss takes
    finite steps that move the weights, through the fused encoder (CUDA's path, in Triton's interpreter) and the plain one."""
    feats = SyntheticFeatures.make(n=96, d=24, mean_active=3, kind="zipf", seed=8)
    config = TrainConfig(arch=arch, d_in=24, d_sae=128, k=None if arch == "gba" else 4, tokens=256 * 4, batch_size=256,
                         lr=2e-3, dead_tokens=256, gba_every=2, init_tokens=512)
    trainer = Trainer.start(config, SyntheticSource(feats, seed=9), backend=backend)
    trainer.stepper.autocast_dtype = torch.bfloat16
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    batches = SyntheticSource(feats, seed=10).batches(256)
    aux = []
    for _ in range(3):
        metrics = trainer.train_step(next(batches))
        assert torch.isfinite(trainer._last_loss) and torch.isfinite(metrics["fvu"])
        aux.append(float(metrics["aux"]))
    if config.aux != "none":
        assert max(aux) > 0, aux  # the aux loss took part (bf16 values through its decode too)
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and not torch.equal(p.detach(), before[name]), name


def test_gba_statistics_from_the_code_match_the_dense_definition():
    """GBA's selection reads z once: its code is JumpReLU's, and the firing counts and peak
    margins it buffers from that code equal their dense definitions over the whole z."""
    g = torch.Generator().manual_seed(11)
    rule = GBARule(200, groups=4)
    rule.threshold.copy_(torch.rand(200, generator=g))
    rule.threshold[:20] = 5.0  # never fire: their peak stays 0
    rule.peak[20:40] = 9.0  # an earlier, larger peak survives
    peak_before = rule.peak.clone()
    z = torch.randn(64, 200, generator=g).to(torch.bfloat16)
    code = rule.train().select(z)
    biased = z.float() - rule.threshold
    assert torch.equal(code.to_dense(200).float(), torch.where(biased > 0, z.float(), 0.0))
    assert torch.equal(rule.fire_count, (biased > 0).sum(dim=0).float())
    assert torch.equal(rule.peak, torch.maximum(peak_before, biased.max(dim=0).values.clamp(min=0)))
    assert int(rule.buffer_tokens) == 64 and float(rule.peak[:20].max()) == 0.0
    assert code.width == int((biased > 0).sum(dim=1).max())
