"""Every page of the app under streamlit's AppTest: no traceback on a missing or empty store,
figures drawn from real stores, and each page's widgets changing its figures' data."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from app.store_access import SAES_ENV, STORE_ENV
from tests.app_stores import demo_stores
from workbench import Store
from workbench.analysis.attention_sinks import special_token_alpha

APP = Path(__file__).resolve().parents[1] / "app" / "main.py"
PAGES = ["overview", "lazy_neurons", "super_experts", "attention_sinks", "routing", "sae_features", "sae_comparison"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return demo_stores(tmp_path_factory.getbasetemp())


def open_page(page: str, store: Path | None, monkeypatch, saes: list[Path] = ()) -> AppTest:
    if store is None:
        monkeypatch.delenv(STORE_ENV, raising=False)
    else:
        monkeypatch.setenv(STORE_ENV, str(store))
    monkeypatch.setenv(SAES_ENV, ":".join(str(s) for s in saes))
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.switch_page(f"views/{page}.py")
    return checked(at.run())


def checked(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    return at


def specs(at: AppTest) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def values(column) -> list:
    """A figure column as a flat list: plotly writes numpy arrays as {"dtype", "bdata" (base64)}."""
    if isinstance(column, dict):
        return np.frombuffer(base64.b64decode(column["bdata"]), dtype=column["dtype"]).tolist()
    return list(column)


def infos(at: AppTest) -> str:
    return " ".join(i.value for i in at.info)


@pytest.mark.parametrize("page", PAGES)
def test_missing_and_empty_stores_say_what_to_run(page, demo, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(demo.dense / "store.json", empty / "store.json")  # a capture that has not finished a batch
    for store in (None, tmp_path / "missing", empty):
        at = open_page(page, store, monkeypatch)
        assert "workbench capture" in infos(at) and not specs(at)


@pytest.mark.parametrize("page,charts", [("lazy_neurons", 3), ("attention_sinks", 3), ("sae_features", 2), ("sae_comparison", 3)])
def test_dense_store_pages_draw_their_figures(page, charts, demo, monkeypatch):
    at = open_page(page, demo.dense, monkeypatch)
    drawn = specs(at)
    assert len(drawn) >= charts and all(fig["data"] for fig in drawn)


@pytest.mark.parametrize("page,probe", [("super_experts", "experts"), ("routing", "routing")])
def test_a_missing_probe_names_the_capture_flag(page, probe, demo, monkeypatch):
    at = open_page(page, demo.dense, monkeypatch)
    assert f"--probes {probe}" in infos(at) and not specs(at)


def test_overview_lists_hooks_probes_and_saes(demo, monkeypatch):
    at = open_page("overview", demo.moe, monkeypatch, saes=demo.saes)
    text = " ".join(m.value for m in at.markdown)
    assert "planted-moe" in text and "1,000 tokens" in text
    assert any("has no feature pass here" in w.value for w in at.warning)  # SAEs of the other store
    at = open_page("overview", demo.dense, monkeypatch, saes=demo.saes)
    assert not at.warning
    assert set(at.dataframe[1].value["rule"]) == {"topk", "mutual-choice", "gba"}


def test_lazy_neuron_widgets_change_the_figures(demo, monkeypatch):
    at = open_page("lazy_neurons", demo.dense, monkeypatch)
    before = specs(at)
    checked(at.number_input[0].set_value(5).run())
    assert specs(at)[2]["data"] != before[2]["data"]
    checked(at.multiselect[0].set_value([0]).run())
    assert len(specs(at)[1]["data"]) == 1 < len(before[1]["data"])
    dense = len(at.dataframe[1].value)
    checked(at.slider[0].set_value(0.5).run())
    assert len(at.dataframe[1].value) > dense


def test_moe_lazy_page_draws_experts_and_its_widgets_change_them(demo, monkeypatch):
    at = open_page("lazy_neurons", demo.moe, monkeypatch)
    before = specs(at)
    assert len(before) == 3  # token heatmap, layer x expert heatmap, one layer's per-expert breakdown
    assert "Expert neurons" in " ".join(h.value for h in at.subheader)
    experts = before[1]["data"][0]
    assert len(experts["y"]) == 4 and len(experts["x"]) == 4  # moe_config: 4 layers of 4 experts
    checked(at.selectbox[0].set_value(3).run())
    assert specs(at)[2]["data"] != before[2]["data"]
    checked(at.radio[0].set_value("fat").run())
    assert specs(at)[1]["data"][0]["z"] != experts["z"]


def test_sink_threshold_changes_sink_rate(demo, monkeypatch):
    at = open_page("attention_sinks", demo.dense, monkeypatch)
    before = specs(at)[1]["data"]
    checked(at.slider[0].set_value(0.05).run())
    assert specs(at)[1]["data"] != before


def test_special_token_heatmaps_show_the_stored_alpha(demo, monkeypatch):
    at = open_page("attention_sinks", demo.minilm, monkeypatch)
    titles = {fig["layout"]["title"]["text"].split(" per head")[0]: fig for fig in specs(at)}
    special = special_token_alpha(Store.open(demo.minilm))
    for token in ("[CLS]", "[SEP]"):
        fig = titles[f"Mean alpha of {token}"]
        expected = special[special["special"] == token].pivot(index="layer", columns="head", values="alpha").to_numpy()
        np.testing.assert_allclose(values(fig["data"][0]["z"]), expected.ravel(), rtol=1e-6)
    at = open_page("attention_sinks", demo.dense, monkeypatch)  # a decoder: its <bos> frames every window
    assert any(fig["layout"]["title"]["text"].startswith("Mean alpha of <bos>") for fig in specs(at))


def test_super_expert_cuts_change_the_verdicts(demo, monkeypatch):
    at = open_page("super_experts", demo.moe, monkeypatch)
    stars = specs(at)[0]["data"][1]
    checked(at.slider[0].set_value(50.0).run())
    checked(at.slider[1].set_value(100.0).run())
    assert specs(at)[0]["data"][1] != stars
    assert len(specs(at)) == 2  # heatmap and massive-activation curve


def test_routing_widgets_change_the_figures(demo, monkeypatch):
    at = open_page("routing", demo.moe, monkeypatch)
    before = specs(at)
    assert len(before) == 6
    checked(at.selectbox[0].set_value(3).run())
    after = specs(at)
    assert after[3]["data"] != before[3]["data"] and after[2]["data"] != before[2]["data"]
    checked(at.slider[1].set_value(0.5).run())
    assert specs(at)[5]["data"] != after[5]["data"]


def test_feature_page_widgets_and_search(demo, monkeypatch):
    at = open_page("sae_features", demo.dense, monkeypatch)
    hist = specs(at)[1]["data"]
    feature = at.number_input(key="feature").value
    checked(at.number_input(key="feature").set_value((feature + 1) % 64).run())
    assert specs(at)[1]["data"] != hist
    density = specs(at)[0]["data"]
    checked(at.selectbox[0].set_value(at.selectbox[0].options[-1]).run())
    assert specs(at)[0]["data"] != density
    checked(at.text_input[0].set_value("e").run())
    assert len(at.dataframe[0].value) > 0 and {"feature", "fires"} <= set(at.dataframe[0].value.columns)


def test_comparison_shows_the_chosen_saes(demo, monkeypatch):
    at = open_page("sae_comparison", demo.dense, monkeypatch)
    assert len(specs(at)[0]["data"][0]["x"]) == 3
    checked(at.multiselect[0].set_value(at.multiselect[0].value[:2]).run())
    bars, training, density = specs(at)[:3]
    assert len(bars["data"][0]["x"]) == 2 and len(training["data"]) == 2 * 3 and len(density["data"]) == 2



@pytest.fixture(scope="module")
def zoo_store(tmp_path_factory, tiny_relu):
    """A store of tiny-relu (a model the app can load by name, context 256) with one SAE passed over it."""
    from sae.config import TrainConfig
    from sae.trainer import Trainer
    from workbench import Store
    from workbench.analysis.features import run_feature_pass
    from workbench.capture.runner import CaptureSettings, run_capture
    from workbench.training_data import StoreSource

    root = tmp_path_factory.mktemp("zoo") / "store"
    hook = "blocks.0.hook_resid_post"
    run_capture(CaptureSettings(model="tiny-relu", data="builtin", hooks=[hook], probes=["sinks"], tokens=512, ctx=64, batch_size=4,
                                store=str(root)), handle=tiny_relu, progress=False)  # fmt: skip
    store = Store.open(root)
    source = StoreSource(store, hook, chunk_tokens=512)
    trainer = Trainer.start(TrainConfig(arch="topk", d_in=source.d_in, d_sae=32, k=4, tokens=512, batch_size=128, init_tokens=256), source)
    trainer.fit(progress=False)
    sae = trainer.save_sae(root.parent / "sae")
    run_feature_pass(store, sae)
    return root, sae


@pytest.mark.parametrize("page", ["sae_features", "attention_sinks"])
def test_a_long_paragraph_is_cut_to_the_models_context(page, zoo_store, monkeypatch):
    """The typed text runs through the model as one window: BOS plus the text, cut to its 256 tokens."""
    store, sae = zoo_store
    at = open_page(page, store, monkeypatch, saes=[sae])
    assert at.text_area, "the page offers no text box on this store"
    paragraph = " ".join(["the river ran quietly past the old mill and the miller slept"] * 40)
    checked(at.text_area[0].set_value(paragraph).run())


def test_a_store_whose_names_carry_sql_draws_the_lazy_neuron_page_and_runs_none(demo, tmp_path, monkeypatch):
    """The page that ran a hostile store's SQL before identifiers were quoted: it still draws,
    and the COPY hidden in a table folder's name writes nothing."""
    store = tmp_path / "store"
    shutil.copytree(demo.dense, store)
    hostile = store / "tables" / "t\" AS SELECT 1; COPY (SELECT 'x') TO 'pwned.csv'; CREATE VIEW \"u"
    hostile.mkdir(parents=True)
    shutil.copy(next((store / "capture").glob("batch-*/tokens.parquet")), hostile / "part-0.parquet")
    monkeypatch.chdir(tmp_path)
    at = open_page("lazy_neurons", store, monkeypatch)
    assert len(specs(at)) == 3
    assert not list(tmp_path.rglob("pwned*"))
