"""The feature pass against a direct encode: every stored row, the stats, FVU, correlations,
the feature-sorted layout, the page's data, and bad input."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from sae.io import load_sae, save_sae
from sae.model import SparseAutoencoder
from sae.rules import JumpReLURule, TopKRule
from tests.app_stores import HOOK, dense_store
from tests.cli_process import run_workbench
from workbench.analysis.feature_page import FeatureTables, TokenText, list_saes
from workbench.analysis.features import features_table, run_feature_pass
from workbench.errors import WorkbenchError


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return dense_store(tmp_path_factory.mktemp("features"), tokens=3000)


def random_sae(folder, rule, d_sae=96, hook=HOOK, d_in=32, seed=0):
    model = SparseAutoencoder(d_in, d_sae, rule)
    model.init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 1))
    return save_sae(folder, model, metadata={"hook_name": hook, "model_name": "planted"})


def test_rows_stats_and_fvu_match_a_direct_encode(store, tmp_path):
    folder = random_sae(tmp_path / "topk", TopKRule(5))
    report = run_feature_pass(store, folder, chunk_tokens=700, corr_tokens=1500)
    model, _ = load_sae(folder)
    x = store.activations(HOOK)
    with torch.no_grad():
        dense = model.feature_acts(x)
        x_hat = model.reconstruct(x)
    rows = store.df(f"SELECT token_index, feature, value FROM {features_table(report.name)}")
    rebuilt = torch.zeros_like(dense)
    rebuilt[rows["token_index"].to_numpy(), rows["feature"].to_numpy()] = torch.tensor(rows["value"].to_numpy())
    torch.testing.assert_close(rebuilt, dense)
    assert report.rows == int((dense > 0).sum()) and report.tokens == len(x) == 3000
    assert report.l0 == pytest.approx(float((dense > 0).sum(1).float().mean()))
    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert report.fvu == pytest.approx(fvu, rel=1e-4)
    stats = FeatureTables(store, report.name).stats
    fired = (dense > 0).sum(0).numpy()
    np.testing.assert_array_equal(stats["count"].to_numpy(), fired)
    np.testing.assert_allclose(stats["max"].to_numpy(), dense.max(0).values.numpy(), rtol=1e-6)
    assert report.dead_fraction == pytest.approx(float((fired == 0).mean()))


def test_layout_is_sorted_by_feature_then_value_in_small_row_groups(store, tmp_path):
    report = run_feature_pass(store, random_sae(tmp_path / "sorted", TopKRule(8)))
    [path] = store.views()[features_table(report.name)]
    table = pq.read_table(path)
    feature, value = table["feature"].to_numpy(), table["value"].to_numpy()
    assert np.all(np.diff(feature) >= 0)
    same = np.diff(feature) == 0
    assert np.all(np.diff(value)[same] <= 0)
    meta = pq.ParquetFile(path).metadata
    assert meta.row_group(0).column(0).statistics.has_min_max


def test_correlations_are_pearson_over_the_sample(store, tmp_path):
    report = run_feature_pass(store, random_sae(tmp_path / "corr", TopKRule(6), d_sae=48), corr_tokens=1000)
    assert report.corr_tokens == 1000
    model, _ = load_sae(tmp_path / "corr")
    with torch.no_grad():
        dense = model.feature_acts(store.activations(HOOK, 0, 1000)).double().numpy()
    tables = FeatureTables(store, report.name)
    feature = int(tables.stats.sort_values("count").iloc[-1]["feature"])
    corr = tables.correlated(feature)
    assert 0 < len(corr) <= 10 and feature not in corr["other"].tolist()
    expected = np.corrcoef(dense.T)[feature]
    np.testing.assert_allclose(corr["corr"].to_numpy(), expected[corr["other"].to_numpy()], atol=1e-4)
    assert corr["corr"].is_monotonic_decreasing


def test_feature_page_examples_and_contexts(store, tmp_path):
    report = run_feature_pass(store, random_sae(tmp_path / "page", JumpReLURule(torch.full((64,), 0.5)), d_sae=64))
    tables, text = FeatureTables(store, report.name), TokenText(store)
    feature = int(tables.stats.sort_values("count").iloc[-1]["feature"])
    page = tables.page(feature, text, n_top=5, left=6, right=2)
    token_index, value = tables.rows(feature)
    assert [e.value for e in page.top] == pytest.approx(sorted(value, reverse=True)[:5])
    tokens = store.tokens()
    for example in page.top:
        assert example.acts[example.centre] == pytest.approx(example.value)
        assert example.tokens[example.centre] == tokens["token"][example.token_index]
        seq = tokens["seq"][example.token_index]
        assert len(example.tokens) <= 9 and all(tokens["seq"][example.token_index - example.centre + i] == seq for i in range(len(example.tokens)))
    for label, examples in page.intervals:
        lo, hi = (float(v) for v in label.split(" to "))
        assert all(lo - 1e-3 < e.value <= hi + 1e-3 for e in examples)
    assert page.count == len(value) and len(page.values) == len(value)
    with pytest.raises(WorkbenchError, match="out of range"):
        tables.page(10_000, text)


def test_token_text_holds_ids_and_windows_stay_in_their_sequence(store):
    text, tokens = TokenText(store), store.tokens()
    seq, strings = tokens["seq"].to_numpy(), tokens["token"].tolist()
    assert len(text) == len(tokens) and text.token_id.dtype == np.int32
    assert len(text.strings) == tokens["token_id"].max() + 1  # the vocabulary's strings, not one per token
    for t in range(len(tokens)):
        want = np.arange(max(t - 6, 0), min(t + 3, len(tokens)))
        got = text.window(t, 6, 2)
        np.testing.assert_array_equal(got, want[seq[want] == seq[t]])
        assert text.text(got) == [strings[i] for i in got]


def test_token_search_counts_firings_on_that_token(store, tmp_path):
    report = run_feature_pass(store, random_sae(tmp_path / "search", TopKRule(4), d_sae=32))
    found = FeatureTables(store, report.name).search_token(" e ")
    on_e = store.df("SELECT token_index FROM tokens WHERE token = 'e'")["token_index"]
    rows = store.df(f"SELECT feature, token_index FROM {features_table(report.name)}")
    expected = rows[rows["token_index"].isin(on_e)]["feature"].value_counts()
    assert found["fires"].iloc[0] == expected.iloc[0]
    assert dict(zip(found["feature"], found["fires"])) == {f: n for f, n in expected.items() if f in set(found["feature"])}


def test_a_second_pass_replaces_the_sae_row(store, tmp_path):
    folder = random_sae(tmp_path / "again", TopKRule(3), d_sae=32)
    run_feature_pass(store, folder)
    run_feature_pass(store, folder)
    saes = list_saes(store)
    assert (saes["name"] == "again").sum() == 1 and saes.set_index("name").loc["again", "rule"] == "topk"


def test_bad_input_says_what_to_do(store, tmp_path):
    with pytest.raises(WorkbenchError, match="does not hold"):
        run_feature_pass(store, random_sae(tmp_path / "other_hook", TopKRule(2), hook="blocks.0.hook_resid_pre"))
    with pytest.raises(WorkbenchError, match="d_in=16"):
        run_feature_pass(store, random_sae(tmp_path / "narrow", TopKRule(2), d_in=16))
    done = run_workbench("features", str(tmp_path / "nothing"), "--store", str(store.root))
    assert done.returncode == 2 and "is not an SAE folder" in done.stderr
    done = run_workbench("app", "--store", str(tmp_path / "no-store"))
    assert done.returncode == 2 and "workbench capture" in done.stderr
