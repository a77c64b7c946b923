"""The link tables on planted cases: each link finds the expert, sink, massive activation,
neuron or phenomenon its feature was planted on, against the probes' rows read directly."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from tests.cli_process import run_workbench
from tests.link_stores import (
    DEAD,
    DENSE,
    NEURON_ROWS,
    SINK_HEAD,
    dense_handle,
    link_stores,
    massive_tokens,
    neuron_tokens,
    routed_expert,
    sink_tokens,
    super_expert,
)  # fmt: skip
from workbench import Store
from workbench.analysis.features import run_feature_pass
from workbench.analysis.lazy_neurons import neuron_frequencies
from workbench.analysis.link_reader import feature_links, features_on, informative_feature, links_state, opening_feature
from workbench.analysis.links import _stream_layers, experts_table, neuron_cosines, summary_table


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return link_stores(tmp_path_factory.getbasetemp())


def test_a_feature_on_one_experts_tokens_links_to_that_expert(stores):
    store = stores.moe
    expert, tokens = routed_expert(store)
    rows = store.df(f"SELECT * FROM {experts_table('planted')} WHERE feature = 0 AND layer = 1 ORDER BY expert")
    routed = store.df("SELECT expert, count(*) AS n FROM routing_choices WHERE layer = 1 AND token_index IN "
                      f"({', '.join(map(str, tokens))}) GROUP BY expert")  # fmt: skip
    assert dict(zip(rows["expert"], rows["slots"])) == dict(zip(routed["expert"], routed["n"]))
    best = rows.sort_values("lift", ascending=False).iloc[0]
    assert int(best["expert"]) == expert and best["share"] == pytest.approx(len(tokens) / rows["slots"].sum())
    load = store.df("SELECT sum(slots) FILTER (WHERE expert = ?) / sum(slots) AS s FROM routing_load WHERE layer = 1", [expert])
    assert best["load_share"] == pytest.approx(float(load["s"][0])) and best["lift"] > 2


def test_sink_and_massive_shares_count_the_planted_tokens(stores):
    dense = feature_links(stores.dense, "planted", 0).summary
    sinks = sink_tokens(stores.dense)
    assert len(sinks) >= 40  # the planted head sinks into every sample's first token
    assert dense["sink_fires"] == len(sinks) and dense["sink_share"] == 1.0
    assert dense["sink_base"] == pytest.approx(len(sinks) / stores.dense.n_tokens())
    assert feature_links(stores.dense, "planted", 1).summary["sink_share"] == 0.0
    assert pd.isna(dense["massive_share"])  # no experts probe on the dense store: not captured, not zero
    massive = massive_tokens(stores.moe)
    assert len(massive) >= 15  # [BOS] of every whole sample
    moe = feature_links(stores.moe, "planted", 1).summary
    assert moe["massive_fires"] == len(massive) and moe["massive_share"] == 1.0
    assert feature_links(stores.moe, "planted", 2).summary["massive_share"] == 0.0


def test_a_decoder_row_equal_to_a_neuron_output_links_to_that_neuron(stores):
    frequencies = neuron_frequencies(stores.dense).set_index(["layer", "rule", "neuron"])["frequency"]
    for feature, (layer, neuron) in NEURON_ROWS.items():
        first = feature_links(stores.dense, "neurons", feature).neurons.iloc[0]
        assert (int(first["layer"]), int(first["neuron"])) == (layer, neuron)
        assert first["cosine"] == pytest.approx(1.0, abs=1e-5) and first["rule"] == "zero"
        assert first["frequency"] == pytest.approx(frequencies[(layer, "zero", neuron)])
    handle = dense_handle()
    w_out = {l: handle.model.blocks[l].mlp.W_out.detach() for l in (0, 1)}
    flipped = neuron_cosines(-w_out[1][7:8], w_out, top=3)  # anti-aligned: the closest is another neuron
    assert not ((flipped["layer"] == 1) & (flipped["neuron"] == 7)).any() and flipped["cosine"].is_monotonic_decreasing
    assert _stream_layers("blocks.0.hook_resid_post", [0, 1]) == [0] and _stream_layers("blocks.1.hook_resid_pre", [0, 1]) == [0]
    assert _stream_layers("blocks.1.hook_mlp_out", [0, 1]) == [1] and _stream_layers("hook_embed", [0, 1]) == [0, 1]


def test_phenomena_link_back_to_the_features_on_their_tokens(stores):
    layer, expert, is_super, tokens = super_expert(stores.moe)
    experts = features_on(stores.moe, "planted", "expert", marked_only=False)
    top = experts[(experts["layer"] == layer) & (experts["unit"] == expert)].iloc[0]
    assert int(top["feature"]) == 3 and top["fires"] == top["tokens"] == len(tokens) and top["share"] == 1.0
    assert top["marked"] == ("super" if is_super else "")
    heads = features_on(stores.dense, "planted", "head")
    assert set(heads["marked"]) == {"sink"}
    planted = heads[(heads["layer"] == SINK_HEAD[0]) & (heads["unit"] == SINK_HEAD[1])].set_index("feature")
    assert planted.loc[0, "share"] == 1.0 and planted["share"].max() == 1.0  # feature 0 fires on every token it sinks into
    assert planted.loc[0, "tokens"] >= 40  # every sample's first token
    neurons = features_on(stores.dense, "planted", "neuron")
    for (layer, neuron), feature, mark in ((DEAD, 2, "dead"), (DENSE, 3, "dense")):
        mine = neurons[(neurons["layer"] == layer) & (neurons["unit"] == neuron)].set_index("feature")
        assert set(mine["marked"]) == {mark} and mine.loc[feature, "share"] == 1.0
        assert mine.loc[feature, "fires"] == mine.loc[feature, "tokens"] == len(neuron_tokens(stores.dense, layer, neuron))


def test_the_page_opens_on_a_feature_of_varied_tokens_after_position_zero(stores):
    summary = stores.dense.df(f"SELECT * FROM {summary_table('planted')} ORDER BY feature").set_index("feature")
    assert summary.loc[5, "top_pos0_share"] > 0.5 and summary.loc[5, "top_token_entropy"] > summary.loc[4, "top_token_entropy"]
    assert summary.loc[4, "distinct_top_tokens"] == 3 and summary.loc[6, "top_token_entropy"] == 0.0
    assert informative_feature(stores.dense, "planted") == opening_feature(stores.dense, "planted") == 4


def test_links_go_stale_with_a_new_feature_pass_and_the_cli_refreshes_them(stores, tmp_path):
    shutil.copytree(stores.dense.root, tmp_path / "store")  # the other tests keep the original
    store = Store.open(tmp_path / "store")
    assert links_state(store, "neurons") == "current" and links_state(store, "nothing") == "missing"
    [folder] = store.df("SELECT folder FROM saes WHERE name = 'neurons'")["folder"]
    run_feature_pass(store, folder, name="neurons")
    assert links_state(store, "neurons") == "stale"
    done = run_workbench("links", "--store", str(store.root), "--sae", "neurons")
    assert done.returncode == 0, done.stderr
    assert "neuron links skipped: unknown model 'planted'" in done.stdout  # the test model is not loadable by name
    assert links_state(store, "neurons") == "current"
    assert len(feature_links(store, "neurons", 0).neurons) == 0 and "not loadable" in feature_links(store, "neurons", 0).neuron_note
    done = run_workbench("links", "--store", str(store.root), "--sae", "nope")
    assert done.returncode == 2 and "has no SAE 'nope'" in done.stderr


def test_the_demo_trains_an_sae_on_tiny_moe_and_links_both_stores(tmp_path):
    from workbench.commands.demo import sae_steps

    steps = sae_steps(tmp_path, 1000)
    moe = str(tmp_path / "tiny-moe")
    assert any(s[0] == "train" and s[s.index("--store") + 1] == moe for s in steps)
    assert any(s[0] == "features" and s[s.index("--store") + 1] == moe for s in steps)
    links = [s for s in steps if s[0] == "links"]
    assert [s[-1] for s in links] == [str(tmp_path / "tiny-relu"), moe] and steps[-2:] == links  # after every feature pass
