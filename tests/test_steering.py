"""Steering a feature during generation on the zoo's tiny-relu: a planted decoder direction
raises its own top logit and takes over greedy generation, clamp and add agree on it, the
generation is deterministic, bad input is refused, and the feature page runs it."""

from __future__ import annotations

import pytest
import torch

from sae.io import save_sae
from sae.model import SparseAutoencoder
from sae.rules import TopKRule
from tests.app_stores import ZOO_HOOK, demo_stores
from tests.test_app_pages import checked, open_page, specs
from workbench.errors import WorkbenchError
from workbench.steering import steer, steer_loaded

FEATURE, PROMPT = 5, "def main():\n    return"


@pytest.fixture(scope="module")
def planted(tiny_relu):
    """A TopK SAE on tiny-relu's residual stream whose feature FEATURE writes the unembedding
    column of one token (so its decoder direction's top logit is known from the weights)."""
    sae = SparseAutoencoder(tiny_relu.d_model, 32, TopKRule(4))
    sae.init_weights(torch.Generator().manual_seed(0))
    column = tiny_relu.model.W_U[:, 1234].detach()
    with torch.no_grad():
        sae.W_dec[FEATURE] = column / column.norm()
    top = int((sae.W_dec[FEATURE] @ tiny_relu.model.W_U).argmax())
    return sae, top


@pytest.mark.parametrize("mode", ["add", "clamp"])
def test_a_steered_feature_raises_its_top_logit_and_takes_over_generation(tiny_relu, planted, mode):
    sae, top = planted
    result = steer_loaded(tiny_relu, sae, ZOO_HOOK, FEATURE, mode, 30.0, PROMPT, max_new_tokens=6)
    clean_ids = tiny_relu.tokenize(result.clean_text)
    assert top not in clean_ids[:1]  # the clean model does not say it anyway
    assert result.moved["token_id"].iloc[0] == top and result.moved["change"].iloc[0] > 5
    assert result.moved["change"].is_monotonic_decreasing
    assert result.steered[0] == tiny_relu.token_strings([top])[0]
    again = steer_loaded(tiny_relu, sae, ZOO_HOOK, FEATURE, mode, 30.0, PROMPT, max_new_tokens=6)
    assert (again.clean, again.steered) == (result.clean, result.steered)


def test_zero_strength_changes_nothing(tiny_relu, planted):
    result = steer_loaded(tiny_relu, planted[0], ZOO_HOOK, FEATURE, "add", 0.0, PROMPT, max_new_tokens=5)
    assert result.steered == result.clean and len(result.clean) == 5
    assert result.moved["change"].abs().max() == 0


def test_steer_loads_model_and_sae_folder(tiny_relu, planted, tmp_path):
    sae, top = planted
    folder = save_sae(tmp_path / "planted", sae, metadata={"hook_name": ZOO_HOOK, "model_name": "tiny-relu"})
    result = steer("tiny-relu", folder, FEATURE, "add", 30.0, PROMPT, max_new_tokens=3)
    assert result.moved["token_id"].iloc[0] == top and result.steered[0] == tiny_relu.token_strings([top])[0]


def test_bad_input_is_refused(tiny_relu, planted):
    sae = planted[0]
    for kwargs, match in [({"mode": "boost"}, "not one of add, clamp"), ({"feature": 32}, "out of range"),
                          ({"hook": "blocks.9.hook_resid_post"}, "unknown hook"), ({"max_new_tokens": 0}, "at least 1")]:  # fmt: skip
        args = {"hook": ZOO_HOOK, "feature": FEATURE, "mode": "add", "max_new_tokens": 2, **kwargs}
        with pytest.raises(WorkbenchError, match=match):
            steer_loaded(tiny_relu, sae, args["hook"], args["feature"], args["mode"], 1.0, PROMPT, args["max_new_tokens"])
    narrow = SparseAutoencoder(16, 8, TopKRule(2))
    with pytest.raises(WorkbenchError, match="d_in=16"):
        steer_loaded(tiny_relu, narrow, ZOO_HOOK, 0, "add", 1.0, PROMPT, 2)


def test_feature_page_steers_on_submit(tmp_path_factory, monkeypatch):
    demo = demo_stores(tmp_path_factory.getbasetemp())
    at = open_page("sae_features", demo.zoo, monkeypatch)
    assert not any("Next-token logits" in s["layout"]["title"]["text"] for s in specs(at))
    at.number_input(key="feature").set_value(3).run()
    [strength] = [n for n in at.number_input if n.label.startswith("Strength")]
    strength.set_value(200.0)
    at = checked(next(b for b in at.button if b.label == "Generate").click().run())
    clean, steered = (c.value for c in at.code)
    assert clean != steered and clean.startswith("def load(path):")
    [moved] = [s for s in specs(at) if "Next-token logits" in s["layout"]["title"]["text"]]
    assert len(moved["data"][0]["y"]) == 20  # 10 rises, 10 falls
