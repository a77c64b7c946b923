"""`workbench export-neuronpedia`: every feature of a tiny-relu SAE as Neuronpedia's feature
JSON (checked against a JSON Schema of SAEDashboard's NeuronpediaDashboardBatch / Feature /
Activation fields and against the feature pass's tables), and the local release file that lets
load_sae("release/id") find the SAE offline."""

from __future__ import annotations

import json
from itertools import pairwise

import jsonschema
import numpy as np
import pytest
import torch

from sae.io import load_sae as load_folder
from tests.app_stores import demo_stores
from tests.cli_process import run_workbench
from workbench import Store
from workbench.analysis.feature_page import FeatureTables
from workbench.errors import WorkbenchError
from workbench.models.registry import load_model
from workbench.releases import RELEASES_ENV, load_sae, read_releases, register_release

NUMBERS = {"type": "array", "items": {"type": "number"}}
INTS = {"type": "array", "items": {"type": "integer"}}
STRINGS = {"type": "array", "items": {"type": "string"}}
ACTIVATION = {
    "type": "object",
    "required": ["bin_min", "bin_max", "bin_contains", "tokens", "values"],
    "properties": {"bin_min": {"type": "number"}, "bin_max": {"type": "number"}, "bin_contains": {"type": "number"},
                   "tokens": STRINGS, "values": NUMBERS},
}  # fmt: skip
FEATURE_FIELDS = {
    "feature_index": {"type": "integer", "minimum": 0},
    "neuron_alignment_indices": INTS, "neuron_alignment_values": NUMBERS, "neuron_alignment_l1": NUMBERS,
    "correlated_neurons_indices": INTS, "correlated_neurons_l1": NUMBERS, "correlated_neurons_pearson": NUMBERS,
    "correlated_features_indices": INTS, "correlated_features_l1": NUMBERS, "correlated_features_pearson": NUMBERS,
    "neg_str": STRINGS, "neg_values": NUMBERS, "pos_str": STRINGS, "pos_values": NUMBERS,
    "frac_nonzero": {"type": "number", "minimum": 0, "maximum": 1},
    "freq_hist_data_bar_values": NUMBERS, "freq_hist_data_bar_heights": NUMBERS,
    "logits_hist_data_bar_heights": NUMBERS, "logits_hist_data_bar_values": NUMBERS,
    "n_prompts_total": {"type": "integer"}, "n_tokens_in_prompt": {"type": "integer"}, "dataset": {"type": "string"},
    "decoder_weights_dist": NUMBERS, "activations": {"type": "array", "items": ACTIVATION},
}  # fmt: skip
BATCH = {
    "type": "object",
    "required": ["model_id", "layer", "sae_set", "features"],
    "properties": {"model_id": {"type": "string"}, "layer": {"type": "integer"}, "sae_set": {"type": "string"},
                   "features": {"type": "array", "items": {"type": "object", "required": list(FEATURE_FIELDS),
                                                           "properties": FEATURE_FIELDS}}},
}  # fmt: skip


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    demo = demo_stores(tmp_path_factory.getbasetemp())
    out, releases = tmp_path_factory.mktemp("np"), tmp_path_factory.mktemp("rel") / "pretrained_saes.yaml"
    done = run_workbench("export-neuronpedia", str(demo.zoo_sae), "--store", str(demo.zoo), "--out", str(out / "json"),
                         "--features-per-file", "100", env={RELEASES_ENV: str(releases)})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "256 features in 3 file(s)" in done.stdout and "tiny-relu-workbench/sae_topk" in done.stdout
    batches = [json.loads((out / "json" / f"batch-{i}.json").read_text()) for i in range(3)]
    return demo, batches, releases


def test_batches_validate_against_the_schema(exported):
    _, batches, _ = exported
    for batch in batches:
        jsonschema.validate(batch, BATCH)
        assert batch["model_id"] == "tiny-relu" and batch["layer"] == 2 and batch["sae_set"] == "2-sae_topk"
    indices = [f["feature_index"] for b in batches for f in b["features"]]
    assert indices == list(range(256)) and [len(b["features"]) for b in batches] == [100, 100, 56]


def test_bins_are_sorted_and_match_the_tables(exported):
    demo, batches, _ = exported
    tables = FeatureTables(Store.open(demo.zoo), "sae_topk")
    live = 0
    for feature in (f for b in batches for f in b["features"]):
        stat = tables.stats.iloc[feature["feature_index"]]
        assert feature["frac_nonzero"] == pytest.approx(stat["density"])
        assert sum(feature["freq_hist_data_bar_heights"]) == stat["count"]
        acts = feature["activations"]
        for a in acts:
            assert len(a["tokens"]) == len(a["values"]) > 0
        top = [a for a in acts if a["bin_min"] == -1]
        bins = [a for a in acts if a["bin_min"] != -1]
        assert acts[: len(top)] == top  # the top examples come first
        if stat["count"] == 0:
            assert not acts
            continue
        live += 1
        assert max(top[0]["values"]) == pytest.approx(stat["max"], abs=1e-3) and top[0]["bin_max"] == pytest.approx(stat["max"])
        edges = [(a["bin_min"], a["bin_max"], a["bin_contains"]) for a in bins]
        distinct = list(dict.fromkeys(edges))
        assert [lo for lo, _, _ in distinct] == sorted((lo for lo, _, _ in distinct), reverse=True)  # highest bin first
        assert all(hi_next <= lo for (lo, _, _), (_, hi_next, _) in pairwise(distinct))
        for lo, hi, _ in distinct:
            assert all(lo - 1e-3 <= max(a["values"]) for a in bins if (a["bin_min"], a["bin_max"]) == (lo, hi))
        corr = tables.correlated(feature["feature_index"])
        assert feature["correlated_features_indices"] == corr["other"].tolist()
    assert live > 10


def test_logits_are_the_decoder_rows_through_the_unembedding(exported):
    demo, batches, _ = exported
    sae, _ = load_folder(demo.zoo_sae)
    handle = load_model("tiny-relu")
    for feature in batches[1]["features"][:5]:
        effect = sae.W_dec[feature["feature_index"]] @ handle.model.W_U
        top = torch.topk(effect, 10)
        assert feature["pos_str"] == handle.token_strings(top.indices.tolist())
        np.testing.assert_allclose(feature["pos_values"], top.values.detach().numpy(), atol=1e-3)
        assert feature["neg_values"] == sorted(feature["neg_values"]) and feature["neg_values"][0] == pytest.approx(float(effect.min()), abs=1e-3)
        assert sum(feature["logits_hist_data_bar_heights"]) == handle.model.cfg.d_vocab


def test_load_sae_finds_the_release_offline(exported, monkeypatch):
    demo, _, releases = exported
    monkeypatch.setenv(RELEASES_ENV, str(releases))
    model, cfg = load_sae("tiny-relu-workbench/sae_topk")
    direct, _ = load_folder(demo.zoo_sae)
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post"
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(model, name), getattr(direct, name))
    with pytest.raises(WorkbenchError, match="listed: tiny-relu-workbench/sae_topk"):
        load_sae("tiny-relu-workbench/other")


def test_release_file_round_trip_and_bad_files(tmp_path, monkeypatch, exported):
    demo = exported[0]
    path = tmp_path / "releases.yaml"
    monkeypatch.setenv(RELEASES_ENV, str(path))
    register_release("mine", "a/b", demo.zoo_sae, "tiny-relu", l0=8.0)
    register_release("mine", "a/b", demo.zoo_sae, "tiny-relu", l0=9.0)  # replaced, not duplicated
    assert path.read_text().count("id: a/b") == 1 and "l0: 9.0" in path.read_text()
    assert load_sae("mine/a/b")[0].d_sae == 256
    with pytest.raises(WorkbenchError, match="of model 'tiny-relu'"):
        register_release("mine", "c", demo.zoo_sae, "tiny-moe")
    for hostile in ("mine: [1, 2", "- just a list", "mine: {saes: [{id: x}]}"):
        path.write_text(hostile)
        with pytest.raises(WorkbenchError, match="release file"):
            load_sae("mine/x")
    done = run_workbench("export-neuronpedia", "mine/x", "--store", str(demo.zoo), "--out", str(tmp_path / "o"),
                         env={RELEASES_ENV: str(path)})  # fmt: skip
    assert done.returncode == 2 and done.stderr.startswith("error: release file") and not (tmp_path / "o").exists()


def test_train_lists_its_sae_in_a_release(exported, tmp_path):
    demo = exported[0]
    path, out = tmp_path / "releases.yaml", tmp_path / "small-topk"
    args = ["train", "--store", str(demo.zoo), "--hook", "blocks.2.hook_resid_post", "--k", "4", "--d-sae", "64",
            "--tokens", "1024", "--batch-size", "256", "--no-progress", "--out", str(out)]  # fmt: skip
    done = run_workbench(*args, "--release", "bad/name", env={RELEASES_ENV: str(path)})
    assert done.returncode == 2 and "without '/'" in done.stderr and not out.exists()
    done = run_workbench(*args, "--release", "small", env={RELEASES_ENV: str(path)})
    assert done.returncode == 0, done.stderr
    assert "listed as small/small_topk" in done.stdout
    [entry] = read_releases(path)["small"]["saes"]
    assert entry["id"] == "small_topk" and entry["l0"] == pytest.approx(4.0)
    model, _ = load_folder(entry["path"])
    assert model.d_sae == 64
