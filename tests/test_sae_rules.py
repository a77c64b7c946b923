"""Each rule's invariant: TopK keeps at most k per row; Mutual Choice keeps k*B per batch and
its learned threshold reproduces that budget at inference; GBA's targets come from d_sae,
its L0 stays under their ceiling from the first step and its biases in [-1, 0]."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from sae.config import TrainConfig
from sae.errors import SAEError
from sae.rules import GBARule, MutualChoiceRule, TopKRule
from sae.rules.gba import geometric_targets
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
    rule.after_step(None, 0)  # the threshold takes the step's smallest kept value (a first update sets it)
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


@pytest.mark.parametrize("d_sae", [512, 1536, 24576])
def test_gba_targets_and_groups_come_from_d_sae(d_sae):
    """The paper's ladder (10 groups, geometric, span 100) with its top at min(0.1, 128/d_sae):
    the expected L0 ceiling is the paper's 0.025 * d_sae for narrow SAEs and about 32 for wide
    ones; the update period covers the paper's 25,600 tokens or 10 firings of the lowest target."""
    rule = GBARule(d_sae)
    targets = rule.group_target
    assert len(targets) == 10 and torch.all(targets[1:] < targets[:-1])
    assert float(targets[0]) == pytest.approx(min(0.1, 128 / d_sae))
    assert float(targets[-1]) == pytest.approx(float(targets[0]) / 100)
    sizes = torch.bincount(rule.group, minlength=10)
    assert int(sizes.max() - sizes.min()) <= 1
    ceiling = float(rule.target.sum())
    assert ceiling == pytest.approx(min(0.1 * d_sae, 128) * float(geometric_targets(10, 1.0, 0.01).mean()), rel=0.01)
    assert ceiling <= 32.0
    config = TrainConfig(arch="gba", d_in=64, d_sae=d_sae, tokens=4096 * 10, batch_size=4096)
    assert (config.rule.gba_p_max, config.rule.gba_p_min) == pytest.approx((float(targets[0]), float(targets[-1])))
    assert config.rule.gba_every == max(1, round(max(25_600, math.ceil(10 / config.rule.gba_p_min)) / 4096))


def test_gba_l0_stays_near_its_ceiling_from_the_first_step():
    """Biases start at the targets on the first batch, so no step's code is wide (a zero start
    fires half of d_sae), and L0 stays within a band below the targets' ceiling while the
    rule adapts; biases stay in [-1, 0] and the groups fire in the order of their targets."""
    feats = SyntheticFeatures.make(n=96, d=24, mean_active=3, kind="zipf", seed=5)
    config = TrainConfig(arch="gba", d_in=24, d_sae=384, tokens=512 * 150, batch_size=512, lr=2e-3, seed=0)
    trainer = Trainer.start(config, SyntheticSource(feats, seed=6))
    rule: GBARule = trainer.model.rule
    ceiling = float(rule.target.sum())
    widths, l0s = [], []
    select = rule.select

    def recorded(z: torch.Tensor):
        code = select(z)
        widths.append(code.width)
        return code

    rule.select = recorded  # observe each training step's code width
    for batch in itertools.islice(SyntheticSource(feats, seed=6).batches(512), config.steps):
        l0s.append(float(trainer.train_step(batch)["l0"]))
    assert bool(rule.started) and rule.every == config.rule.gba_every
    assert 0.5 * ceiling < l0s[0] <= 1.2 * ceiling, (l0s[0], ceiling)
    assert all(0.3 * ceiling < v < 1.5 * ceiling for v in l0s), (min(l0s), max(l0s), ceiling)
    assert len(widths) == config.steps and max(widths) < config.d_sae // 4, max(widths)  # zero start: about d_sae / 2
    assert float(rule.bias.min()) >= -1.0 and float(rule.bias.max()) <= 0.0
    assert not trainer.model.b_enc.requires_grad and not trainer.model.b_dec.requires_grad
    assert trainer.model.W_enc is None  # tied: the encoder is the decoder's unit directions
    x = next(SyntheticSource(feats, seed=77).batches(8192)) * trainer.input_scale
    with torch.no_grad():
        fired = (trainer.model.pre_acts(x) > rule.threshold).float().mean(0)
    per_group = torch.stack([fired[rule.group == g].mean() for g in range(rule.groups)])
    assert torch.all(per_group[:-2] > per_group[2:]), per_group  # ordered (neighbours at 1e-3 are within noise)
    assert torch.all(per_group < 1.5 * rule.group_target), (per_group, rule.group_target)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("arch", ["topk", "mutual-choice", "gba", "feature-choice"])
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
    rule.started.fill_(True)  # thresholds set by hand, not from the first batch
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


def test_mutual_choice_starts_as_topk_and_a_resume_continues_the_count():
    """The first topk_start of the run's steps keep k per token; then the batch budget,
    also after a resume from the state of a step inside the TopK start."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(32, 300, generator=g)
    z[:4] += 2.0
    rule = MutualChoiceRule(k=5, steps=8, topk_start=0.25)  # TopK for steps 0 and 1
    assert torch.equal(rule(z).l0(), torch.full((32,), 5))
    rule.after_step(None, 0)
    resumed = MutualChoiceRule(k=5, steps=8, topk_start=0.25)
    resumed.load_state_dict(rule.state_dict())
    for r in (rule, resumed):
        assert torch.equal(r(z).l0(), torch.full((32,), 5))
        r.after_step(None, 1)
        code = r(z)
        assert int(code.l0().sum()) == 5 * 32 and code.l0()[:4].float().mean() > 5
    assert MutualChoiceRule(k=5, steps=8, topk_start=0.0)(z).l0()[:4].float().mean() > 5


def test_mutual_choice_topk_start_must_be_a_share_of_the_run():
    with pytest.raises(SAEError, match="topk_start=1"):
        TrainConfig(arch="mutual-choice", d_in=8, d_sae=32, k=4, tokens=1024, batch_size=256, topk_start=1.0)
