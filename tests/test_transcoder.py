"""Transcoders from a real capture of the tiny-relu zoo model (its block-0 MLP input and
output, captured in one pass by `workbench capture`): training transcoders and skip
transcoders from the CLI, eval on the target with the MLP replaced, the feature pass, the
SAELens round trip, and bad input as one line with exit 2."""

from __future__ import annotations

import json
import shutil
import warnings

import pyarrow.parquet as pq
import pytest
import torch

from sae.io import load_sae, save_sae
from sae.model import SparseAutoencoder
from sae.rules import JumpReLURule, ReLURule, TopKRule
from tests.cli_process import run_workbench
from workbench import Store
from workbench.analysis.feature_page import FeatureTables, TokenText
from workbench.analysis.features import run_feature_pass
from workbench.evaluation import evaluate_sae

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IN, OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
TRAIN = ["--d-sae", "192", "--k", "8", "--tokens", "8192", "--batch-size", "256", "--lr", "0.003", "--no-progress", "--chunk-tokens", "512"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("transcoder") / "store"
    done = run_workbench("capture", "--model", "tiny-relu", "--data", "builtin", "--hooks", f"{IN},{OUT}", "--tokens", "2048",
                         "--ctx", "64", "--batch-size", "8", "--store", str(root))
    assert done.returncode == 0, done.stderr
    return Store.open(root)


def train(store, out, *extra):
    done = run_workbench("train", "--store", str(store.root), "--hook", IN, "--target-hook", OUT, *TRAIN, "--out", str(out), *extra)
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    """A TopK transcoder and a TopK skip transcoder, trained by `workbench train`."""
    base = tmp_path_factory.mktemp("transcoder-runs")
    train(store, base / "plain")
    done = train(store, base / "skip", "--skip")
    assert "skip transcoder" in done.stdout
    return {"plain": base / "plain", "skip": base / "skip"}


def target_fvu(model, x, y):
    with torch.no_grad():
        return float((y - model.reconstruct(x)).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


def test_one_capture_stores_both_hooks_aligned_by_token(store, tiny_relu):
    x, y = store.activations(IN), store.activations(OUT)
    assert len(x) == len(y) == 2048
    ids = torch.tensor(store.df("SELECT token_id FROM tokens ORDER BY token_index LIMIT 64")["token_id"].to_numpy())
    _, cache = tiny_relu.model.run_with_cache(ids[None], names_filter=[IN, OUT])
    torch.testing.assert_close(x[:64], cache[IN][0].float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y[:64], cache[OUT][0].float(), rtol=1e-4, atol=1e-4)


def test_cli_trains_transcoders_in_the_saelens_transcoder_layout(store, trained):
    x, y = store.activations(IN), store.activations(OUT)
    for name, folder in trained.items():
        record = json.loads((folder / "training.json").read_text())
        assert record["config"]["d_out"] == 192 and record["config"]["skip"] == (name == "skip")
        assert record["step_kind"] == "autograd" and record["data"]["target_hook"] == OUT
        # it learned: the encoder starts at its fitted scale (first FVU about 1, the target's mean's),
        # and the run ends well below both that start and the mean
        first, last = record["history"][0]["fvu"], record["history"][-1]["fvu"]
        assert last < 0.7 * first and last < 0.7
        cfg = json.loads((folder / "cfg.json").read_text())
        assert cfg["architecture"] == ("topk_skip_transcoder" if name == "skip" else "topk_transcoder")
        assert cfg["d_out"] == 192 and cfg["apply_b_dec_to_input"] is False
        assert cfg["metadata"]["hook_name"] == IN and cfg["metadata"]["hook_name_out"] == OUT
        model, _ = load_sae(folder)
        assert model.transcoder and (model.W_skip is not None) == (name == "skip")
        # the saved (scale-folded) transcoder predicts the raw target as well as training did
        assert target_fvu(model, x, y) == pytest.approx(record["history"][-1]["fvu"], abs=0.1)
    skip_model, _ = load_sae(trained["skip"])
    assert skip_model.W_skip.abs().sum() > 0  # the skip connection trained away from its zero start


def test_eval_reports_the_target_fvu_and_ce_with_the_mlp_replaced(store, trained, tiny_relu):
    x, y = store.activations(IN), store.activations(OUT)
    scores = {}
    for name, folder in trained.items():
        result = evaluate_sae(folder, store, ce_sequences=8, handle=tiny_relu, split="all")
        model, _ = load_sae(folder)
        assert result["target_hook"] == OUT and result["tokens"] == 2048
        assert result["fvu"] == pytest.approx(target_fvu(model, x, y), rel=1e-4)
        assert result["ce_clean"] < result["ce_sae"] < result["ce_zero"]
        scores[name] = result["loss_recovered_zero"]
    assert scores["skip"] > 0.8 and scores["plain"] > 0.3
    done = run_workbench("eval", str(trained["skip"]), "--store", str(store.root), "--ce-sequences", "4", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["target_hook"] == OUT


def linear_skip_transcoder(x, y, zero: bool = False):
    """A skip transcoder whose features write nothing: y_hat = x W_skip^T + b_dec, the least
    squares fit of y on x (or everything zero)."""
    model = SparseAutoencoder(x.shape[1], 64, TopKRule(4), d_out=y.shape[1], skip=True)
    model.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.W_dec.zero_()
        if not zero:
            ones = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
            fit = torch.linalg.lstsq(ones, y.double()).solution
            model.W_skip.copy_(fit[:-1].T)
            model.b_dec.copy_(fit[-1])
    return model


def test_ce_replaces_the_mlp_output_with_the_prediction_from_its_input(store, tiny_relu, tmp_path):
    x, y = store.activations(IN), store.activations(OUT)
    meta = {"hook_name": IN, "hook_name_out": OUT, "model_name": "tiny-relu"}
    linear = save_sae(tmp_path / "linear", linear_skip_transcoder(x, y), metadata=meta)
    nothing = save_sae(tmp_path / "zero", linear_skip_transcoder(x, y, zero=True), metadata=meta)
    skip_only = evaluate_sae(linear, store, ce_sequences=8, handle=tiny_relu, split="all")
    zero = evaluate_sae(nothing, store, ce_sequences=8, handle=tiny_relu, split="all")
    assert skip_only["loss_recovered_zero"] > 0.5  # the linear part of the MLP alone recovers much of it
    assert zero["ce_sae"] == pytest.approx(zero["ce_zero"], rel=1e-5)  # predicting 0 is the zero ablation
    assert zero["fvu"] == pytest.approx(1 + float(y.mean(0).pow(2).sum() * len(y) / (y - y.mean(0)).pow(2).sum()), rel=1e-4)


def test_feature_pass_and_page_of_a_transcoder(store, trained):
    folder = trained["skip"]
    report = run_feature_pass(store, folder, name="skip_tc", corr_tokens=1000)
    model, _ = load_sae(folder)
    x, y = store.activations(IN), store.activations(OUT)
    with torch.no_grad():
        dense = model.feature_acts(x)  # features come from the encoder over the input hook
    assert report.hook == IN and report.rows == int((dense > 0).sum())
    assert report.fvu == pytest.approx(target_fvu(model, x, y), rel=1e-4)
    tables = FeatureTables(store, "skip_tc")
    feature = int(tables.stats.sort_values("count").iloc[-1]["feature"])
    page = tables.page(feature, TokenText(store), n_top=3)
    assert len(page.top) == 3 and page.top[0].value == pytest.approx(float(dense[:, feature].max()), rel=1e-5)


@pytest.mark.parametrize("rule, skip, architecture", [
    (ReLURule(), False, "transcoder"), (ReLURule(), True, "skip_transcoder"),
    (JumpReLURule(torch.full((64,), 0.05)), False, "jumprelu_transcoder"),
    (JumpReLURule(torch.full((64,), 0.05)), True, "jumprelu_skip_transcoder"),
])
def test_saelens_loads_our_transcoders_and_computes_the_same(tmp_path, rule, skip, architecture):
    from sae_lens import SAE

    model = SparseAutoencoder(24, 64, rule, d_out=16, skip=skip)
    generator = torch.Generator().manual_seed(1)
    model.init_weights(generator)
    with torch.no_grad():
        model.b_enc.normal_(0, 0.1, generator=generator)
        model.b_dec.normal_(0, 0.1, generator=generator)
        if skip:
            model.W_skip.normal_(0, 0.2, generator=generator)
    s, t = 0.5, 3.0  # trained on 0.5 x to predict 3 y: the saved folder takes raw x and predicts raw y
    folder = save_sae(tmp_path / architecture, model, input_scale=s, target_scale=t, metadata={"hook_name": IN, "hook_name_out": OUT})
    assert json.loads((folder / "cfg.json").read_text())["architecture"] == architecture
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = SAE.load_from_disk(str(folder))
    ours, _ = load_sae(folder)
    x = torch.randn(200, 24, generator=generator) * 2
    with torch.no_grad():
        assert type(theirs).__name__.lower() == architecture.replace("_", "")
        torch.testing.assert_close(ours.feature_acts(x), theirs.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.reconstruct(x), theirs(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.reconstruct(x), model.reconstruct(x * s) / t, rtol=1e-5, atol=1e-5)


def test_bad_transcoder_input_is_one_line_and_exit_2(store, tmp_path):
    def refused(*args, expect, settings=TRAIN):
        done = run_workbench("train", *args, "--out", str(tmp_path / "never"), *settings)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and expect in done.stderr, done.stderr
        assert not (tmp_path / "never").exists()

    base = ["--store", str(store.root), "--hook", IN]
    refused(*base, "--target-hook", "blocks.3.hook_mlp_out", expect="target hook 'blocks.3.hook_mlp_out' is not in store")
    refused(*base, "--skip", expect="--skip is a skip transcoder: pass --target-hook too")
    without_k = [a for i, a in enumerate(TRAIN) if "--k" not in TRAIN[max(i - 1, 0) : i + 1]]
    refused(*base, "--target-hook", OUT, "--arch", "gba", expect="ties its encoder to the decoder", settings=without_k)
    short = tmp_path / "short"
    shutil.copytree(store.root, short)
    path = sorted((short / "capture").iterdir())[-1] / f"act.{OUT}.parquet"
    table = pq.read_table(path)
    pq.write_table(table.slice(0, table.num_rows // 2), path)  # the target hook now holds fewer rows than the input
    refused("--store", str(short), "--hook", IN, "--target-hook", OUT, expect="holds 256 rows, its batch's tokens 512")
