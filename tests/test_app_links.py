"""The link sections under streamlit's AppTest, on the planted link stores: the feature page's
"where this feature meets the phenomena" and the phenomena pages' "features on these tokens"."""

from __future__ import annotations

import pytest

from tests.link_stores import SINK_HEAD, link_stores, routed_expert
from tests.test_app_pages import checked, open_page, specs, values


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return link_stores(tmp_path_factory.getbasetemp())


def metrics(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def choose_sae(at, name: str):
    [box] = [s for s in at.selectbox if s.label == "SAE"]
    return checked(box.set_value(name).run())


def test_feature_page_opens_on_the_informative_feature_and_shows_its_links(stores, monkeypatch):
    at = choose_sae(open_page("sae_features", stores.dense.root, monkeypatch), "planted")
    assert "Where this feature meets the phenomena" in [s.value for s in at.subheader]
    assert at.number_input(key="feature").value == 4
    checked(at.number_input(key="feature").set_value(0).run())
    shown = metrics(at)
    assert shown["firings on attention-sink tokens"] == "100.0%" and shown["firings on massive-activation tokens"] == "not captured"
    at = choose_sae(at, "neurons")
    checked(at.number_input(key="feature").set_value(0).run())
    [neurons] = [d.value for d in at.dataframe if "cosine" in d.value.columns]
    assert (int(neurons["layer"].iloc[0]), int(neurons["neuron"].iloc[0])) == (1, 7)


def test_feature_page_draws_the_experts_against_their_load(stores, monkeypatch):
    at = open_page("sae_features", stores.moe.root, monkeypatch)
    checked(at.number_input(key="feature").set_value(0).run())
    [fig] = [f for f in specs(at) if "routed to" in f["layout"]["title"]["text"]]
    expert, _ = routed_expert(stores.moe)
    mine = next(trace for trace in fig["data"] if trace["name"].startswith("feature 0") and trace["xaxis"] == "x2")  # layer 1
    assert max(zip(values(mine["y"]), values(mine["x"])))[1] == expert
    assert metrics(at)["firings on attention-sink tokens"] != "not captured"


@pytest.mark.parametrize(
    "page,store,unit", [("super_experts", "moe", None), ("attention_sinks", "dense", SINK_HEAD), ("lazy_neurons", "dense", None)]
)
def test_phenomena_pages_show_the_features_on_their_tokens(page, store, unit, stores, monkeypatch):
    at = open_page(page, getattr(stores, store).root, monkeypatch)
    assert "Features on these tokens" in [s.value for s in at.subheader]
    [fig] = [f for f in specs(at) if "features firing most on the tokens" in f["layout"]["title"]["text"]]
    assert len(fig["data"]) == 2 and len(fig["data"][0]["x"]) > 0
    if unit is not None:  # the planted sink head: feature 0 of SAE planted (every sink token) fires on all its tokens
        at = choose_sae(at, "planted")
        [box] = [s for s in at.selectbox if s.label == "Head"]
        checked(box.select_index(box.options.index(f"layer {unit[0]} head {unit[1]} (sink)")).run())
        [fig] = [f for f in specs(at) if "features firing most on the tokens" in f["layout"]["title"]["text"]]
        assert dict(zip(values(fig["data"][0]["x"]), values(fig["data"][0]["y"])))["f0"] == 1.0
