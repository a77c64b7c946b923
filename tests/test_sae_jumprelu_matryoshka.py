"""The trained JumpReLU rule and Matryoshka BatchTopK: their gradients against dense
references (SAELens's own JumpReLU estimators; the nested prefix losses written densely),
their sparsity in training, and the CLI run on a real store through SAELens's loader, the
feature pass and the app's feature and comparison pages."""

from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch
from streamlit.testing.v1 import AppTest

from app.store_access import SAES_ENV, STORE_ENV
from sae.config import TrainConfig
from sae.data import TensorSource
from sae.io import load_sae
from sae.model import SparseAutoencoder
from sae.rules.jumprelu import JumpReLUTrainingRule
from sae.rules.matryoshka import MatryoshkaRule, default_widths
from sae.synthetic import SyntheticFeatures, SyntheticSource
from sae.trainer import Trainer
from tests.app_stores import HOOK, dense_store
from tests.test_app_pages import APP, checked, specs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_model(rule, d_in=12, d_sae=40, seed=0):
    model = SparseAutoencoder(d_in, d_sae, rule)
    model.init_weights(torch.Generator().manual_seed(seed), torch.zeros(d_in))
    with torch.no_grad():
        model.b_enc.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed + 1))
    return model


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_jumprelu_gradients_equal_saelens_dense_estimators(backend):
    """Our sparse pass (only entries above theta - eps/2 selected) gives every parameter,
    log_threshold included, the gradient of SAELens's dense JumpReLU and Step estimators
    on (||x - x_hat||^2 + lambda * L0) / variance; theta's is non-zero (the STE reaches it)."""
    from sae_lens.saes.jumprelu_sae import JumpReLU, Step

    # a wide bandwidth and thresholds spread over the pre-activations: many entries near theta
    rule = JumpReLUTrainingRule(40, l0_coefficient=0.05, bandwidth=0.2, init_threshold=0.1, warmup_steps=0)
    model = small_model(rule)
    model.backend = backend
    with torch.no_grad():
        rule.log_threshold.copy_(torch.linspace(-4, -0.5, 40).exp().log())
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(3))
    variance = (x - x.mean(0)).pow(2).sum()

    x_hat, code, _ = model(x)
    ours = grads(model, ((x - x_hat).pow(2).sum() + rule.loss_term(x, x, code, model)) / variance)
    assert code.width < 40  # not the whole dictionary

    theta = rule.threshold
    z = model.pre_acts(x)
    acts = JumpReLU.apply(z, theta, rule.bandwidth, False)
    l0 = Step.apply(z, theta, rule.bandwidth, False).sum()
    reference = grads(model, ((x - (acts @ model.W_dec + model.b_dec)).pow(2).sum() + 0.05 * l0) / variance)

    assert set(ours) == set(reference) == {"W_enc", "b_enc", "W_dec", "b_dec", "rule.log_threshold"}
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)
    assert (ours["rule.log_threshold"] != 0).sum() > 5


def test_jumprelu_lambda_warms_up_and_sets_the_sparsity():
    """Trained on synthetic features, L0 falls from its start, and further with lambda than
    without: the L0 penalty raises the thresholds; lambda rises linearly over the warm-up."""
    feats = SyntheticFeatures.make(n=96, d=24, mean_active=3, seed=8)
    l0, median = {}, {}
    for lam in (0.0, 0.05):
        config = TrainConfig(arch="jumprelu", d_in=24, d_sae=128, tokens=256 * 150, batch_size=256, lr=1e-2,
                             jumprelu_l0_coefficient=lam, jumprelu_init_threshold=0.05, init_tokens=1024)
        assert config.rule.jumprelu_warmup_steps == 15  # a tenth of the run
        trainer = Trainer.start(config, SyntheticSource(feats, seed=9))
        rule = trainer.model.rule
        assert float(rule.coefficient()) == pytest.approx(lam / 15)
        trainer.fit(progress=False)
        assert float(rule.coefficient()) == pytest.approx(lam)
        l0[lam], median[lam] = trainer.history[-1]["l0"], float(rule.threshold.detach().median())
        assert trainer.history[0]["l0"] > 40 and trainer.history[-1]["fvu"] < 0.3, trainer.history[-1]
    assert l0[0.05] < 0.7 * l0[0.0] and l0[0.05] < 15, l0
    assert median[0.05] > 1.5 * median[0.0] and median[0.05] > 0.05, median


def test_matryoshka_loss_is_the_nested_prefix_losses_and_their_gradient():
    rule = MatryoshkaRule(k=5, widths=(4, 10, 40))
    model = small_model(rule)
    x = torch.randn(32, 12, generator=torch.Generator().manual_seed(4))
    x_hat, code, _ = model(x)
    term = rule.loss_term(x, x, code, model)
    dense = code.to_dense(40)
    want = sum((x - (dense[:, :m] @ model.W_dec[:m] + model.b_dec)).pow(2).sum() for m in (4, 10))
    torch.testing.assert_close(term, want)
    assert (code.indices < 4).any() and (code.indices >= 10).any()
    # the inner levels pull on the first features' decoder rows only
    g = grads(model, term)["W_dec"]
    assert g[:10].abs().sum() > 0 and torch.all(g[10:] == 0)
    assert default_widths(16384) == (1024, 2048, 4096, 8192, 16384) and default_widths(8) == (1, 2, 4, 8)


def test_matryoshka_transcoder_levels_predict_the_target():
    """A skip transcoder's inner levels are its predictions of the target (d_out != d_in),
    linear term included, and the autograd step trains it without a shape error."""
    rule = MatryoshkaRule(k=5, widths=(4, 10, 40))
    model = SparseAutoencoder(12, 40, rule, d_out=7, skip=True)
    model.init_weights(torch.Generator().manual_seed(0), torch.zeros(7))
    with torch.no_grad():
        model.W_skip.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    x = torch.randn(32, 12, generator=torch.Generator().manual_seed(4))
    y = torch.randn(32, 7, generator=torch.Generator().manual_seed(5))
    _, code, _ = model(x)
    dense = code.to_dense(40)
    want = sum((y - (dense[:, :m] @ model.W_dec[:m] + model.b_dec + x @ model.W_skip.T)).pow(2).sum() for m in (4, 10))
    torch.testing.assert_close(rule.loss_term(x, y, code, model), want)
    config = TrainConfig(arch="matryoshka", d_in=12, d_sae=40, d_out=7, skip=True, k=5, matryoshka_widths="4,10,40",
                         tokens=64 * 20, batch_size=64, lr=5e-3, init_tokens=64)
    data = torch.randn(64 * 4, 12, generator=torch.Generator().manual_seed(6))
    target = torch.tanh(data[:, :7]) + 0.5 * data[:, 7:].sum(1, keepdim=True)
    trainer = Trainer.start(config, TensorSource(data, target=target))
    trainer.fit(progress=False)
    assert trainer.history[-1]["fvu"] < trainer.history[0]["fvu"]


def test_matryoshka_l0_is_k_in_training_and_near_it_at_inference():
    feats = SyntheticFeatures.make(n=96, d=24, mean_active=4, kind="zipf", seed=8)
    config = TrainConfig(arch="matryoshka", d_in=24, d_sae=128, k=4, tokens=256 * 200, batch_size=256, lr=5e-3,
                         dead_tokens=2048, init_tokens=1024)
    assert config.rule.matryoshka_widths == "8,16,32,64,128" and config.aux == "auxk"
    trainer = Trainer.start(config, SyntheticSource(feats, seed=9))
    trainer.fit(progress=False)
    assert all(row["l0"] == pytest.approx(4.0) for row in trainer.history)
    x = next(SyntheticSource(feats, seed=99).batches(4096)) * trainer.input_scale
    with torch.no_grad():
        inference_l0 = float(trainer.model.encode(x).l0().float().mean())
    assert 2.5 < inference_l0 < 6.0, inference_l0


@pytest.mark.parametrize(("arch", "settings"), [
    ("jumprelu", {"jumprelu_l0_coefficient": -1.0}), ("jumprelu", {"jumprelu_init_threshold": 0.0}),
    ("matryoshka", {"k": 4, "matryoshka_widths": "8,4,128"}), ("matryoshka", {"k": 4, "matryoshka_widths": "8,64"}),
    ("matryoshka", {"k": 4, "matryoshka_widths": "eight"}),
])
def test_bad_settings_are_refused_by_name(arch, settings):
    from sae.errors import SAEError

    with pytest.raises(SAEError, match=next(iter(settings))):
        TrainConfig(arch=arch, d_in=24, d_sae=128, tokens=1024, batch_size=256, **settings)


@pytest.mark.parametrize("arch", ["jumprelu", "matryoshka"])
def test_both_train_under_bf16_autocast_through_both_encoders(arch):
    """CUDA's default precision through CPU autocast: finite steps that move every trained
    parameter, on the fused encoder (Triton's interpreter) and the plain one."""
    feats = SyntheticFeatures.make(n=96, d=24, mean_active=3, kind="zipf", seed=8)
    for backend in ("triton", "torch"):
        config = TrainConfig(arch=arch, d_in=24, d_sae=64, k=4, tokens=256 * 4, batch_size=256, lr=2e-3, dead_tokens=256,
                             init_tokens=512, jumprelu_bandwidth=0.05, jumprelu_init_threshold=0.3)
        trainer = Trainer.start(config, SyntheticSource(feats, seed=9), backend=backend)
        trainer.stepper.autocast_dtype = torch.bfloat16
        before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
        batches = SyntheticSource(feats, seed=10).batches(256)
        for _ in range(3):
            metrics = trainer.train_step(next(batches))
            assert torch.isfinite(trainer._last_loss) and torch.isfinite(metrics["fvu"])
        for name, p in trainer.model.named_parameters():
            assert p.dtype == torch.float32 and not torch.equal(p.detach(), before[name]), (backend, name)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return dense_store(tmp_path_factory.mktemp("new-rules-store"), tokens=3000)


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    """`workbench train --arch jumprelu|matryoshka`, then `workbench features`, on the store."""
    from workbench.cli import main

    root = tmp_path_factory.mktemp("new-rules")
    flags = {"jumprelu": ["--jumprelu-init-threshold", "0.05", "--jumprelu-l0-coefficient", "0.01"], "matryoshka": ["--k", "4"]}
    with pytest.MonkeyPatch.context() as monkeypatch:
        for arch, extra in flags.items():
            out = root / arch
            for args in (["train", "--store", str(store.root), "--hook", HOOK, "--arch", arch, "--d-sae", "64", *extra,
                          "--tokens", "12288", "--batch-size", "256", "--lr", "0.01", "--out", str(out), "--no-progress",
                          "--chunk-tokens", "1000"],
                         ["features", str(out), "--store", str(store.root), "--name", arch, "--corr-tokens", "2000"]):
                monkeypatch.setattr(sys, "argv", ["workbench", *args])
                try:
                    main()
                except SystemExit as exc:
                    assert not exc.code, (args, exc.code)
    return {arch: root / arch for arch in flags}


@pytest.mark.parametrize("arch", ["jumprelu", "matryoshka"])
def test_cli_run_saves_what_saelens_loads_with_the_same_activations(store, trained, arch):
    folder = trained[arch]
    record = json.loads((folder / "training.json").read_text())
    assert record["finished"] and record["config"]["arch"] == arch and record["step_kind"] == "autograd"
    history = record["history"]
    assert history[-1]["fvu"] < history[0]["fvu"]
    if arch == "jumprelu":
        assert history[-1]["l0"] < 0.7 * history[0]["l0"] and history[-1]["l0"] < 16, history
    else:
        assert history[-1]["l0"] == pytest.approx(4.0)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["metadata"]["workbench"]["arch"] == arch

    from sae_lens import SAE

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = SAE.load_from_disk(str(folder))
    ours, _ = load_sae(folder)
    x = store.activations(HOOK, 0, 1000)
    with torch.no_grad():
        acts = ours.feature_acts(x)
        torch.testing.assert_close(acts, theirs.encode(x), rtol=1e-4, atol=1e-4)
        assert 0 < float((acts > 0).float().sum(1).mean()) < 32
        if arch == "jumprelu":  # per-feature thresholds, as trained
            assert theirs.threshold.detach().unique().numel() > 10


def test_feature_and_comparison_pages_show_both(store, trained, monkeypatch):
    monkeypatch.setenv(STORE_ENV, str(store.root))
    monkeypatch.setenv(SAES_ENV, "")
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.switch_page("views/sae_comparison.py")
    at = checked(at.run())
    assert len(specs(at)[0]["data"][0]["x"]) == 2
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.switch_page("views/sae_features.py")
    at = checked(at.run())
    names = at.selectbox[0].options
    assert any("jumprelu" in n for n in names) and any("matryoshka" in n for n in names), names
    for option in names:
        checked(at.selectbox[0].set_value(option).run())
        assert specs(at)
