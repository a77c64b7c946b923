"""The real all-MiniLM-L6-v2 (packaged weights) over ordinary English: where do its heads put their mass,
and are the special tokens' alpha rows exactly the attention the model's patterns give them?

Measured (ctx 64, 7 paragraphs of English below, all queries): many heads of layers 1-4
give [CLS] (position 0) alpha above 0.3; [SEP] (the window's last position) receives little
(alpha <= ~0.1 in every head). See BENCHMARKS.md, "Phenomena".
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.phenomena_models import ENGLISH
from workbench import Store
from workbench.analysis.attention_sinks import analyze_sinks, key_importance, sink_heads, special_token_alpha
from workbench.capture.runner import CaptureSettings, run_capture
from workbench.models.registry import load_model

CTX = 64


@pytest.fixture(scope="module")
def minilm_store(tmp_path_factory):
    handle = load_model("minilm")
    assert handle.kind == "encoder"
    folder = tmp_path_factory.mktemp("minilm")
    (folder / "text.txt").write_text(ENGLISH)
    run_capture(
        CaptureSettings(model=handle.name, data=str(folder / "text.txt"), hooks=[], tokens=640, ctx=CTX, batch_size=4,
                        store=str(folder / "s"), probes=["sinks"]),
        handle=handle, progress=False,
    )  # fmt: skip
    return handle, Store.open(folder / "s")


@torch.inference_mode()
def test_special_token_alpha_rows_equal_the_patterns_read_directly(minilm_store):
    handle, store = minilm_store
    tokens = store.tokens()
    ids = torch.tensor(tokens["token_id"].values).view(-1, CTX)
    hooks = [f"blocks.{l}.attn.hook_pattern" for l in range(handle.n_layers)]
    cache = handle.run(ids, hooks)
    rows = store.df("SELECT s.layer, s.head, s.pos, s.alpha, t.seq, t.token FROM sink_special_alpha AS s JOIN tokens AS t USING (token_index)")
    assert set(rows["token"]) == {"[CLS]", "[SEP]"}  # plain English: no [UNK]
    sep = rows[rows["token"] == "[SEP]"]
    assert set(sep["pos"]) == {CTX - 1} and len(sep) == len(ids) * handle.n_layers * 12  # every window, layer, head
    for layer, hook in enumerate(hooks):
        direct = cache[hook][:, :, :, CTX - 1].mean(-1)  # encoder: every query sees [SEP]; [windows, heads]
        got = sep[sep["layer"] == layer].sort_values(["seq", "head"])
        np.testing.assert_allclose(got["alpha"].to_numpy(), direct.reshape(-1).numpy(), rtol=1e-5, atol=1e-7)
    mean = special_token_alpha(store).set_index(["special", "layer", "head"])
    assert mean.loc[("[SEP]", 2, 0), "alpha"] == pytest.approx(float(cache[hooks[2]][:, 0, :, CTX - 1].mean()), rel=1e-5)
    assert set(analyze_sinks(store)["special"]["special"]) == {"[CLS]", "[SEP]"}


def test_minilm_sink_heads_sit_on_cls(minilm_store):
    handle, store = minilm_store
    ends = store.df("SELECT pos, list(DISTINCT token) AS tokens FROM tokens WHERE pos IN (0, ?) GROUP BY pos ORDER BY pos", [CTX - 1])
    assert [list(t) for t in ends["tokens"]] == [["[CLS]"], ["[SEP]"]]
    heads = sink_heads(store)
    assert len(heads) >= 10  # a real sink pattern, not one stray head
    assert set(heads["layer"]) <= {1, 2, 3, 4, 5}
    alpha = key_importance(store)
    cls = alpha[alpha["pos"] == 0].set_index(["layer", "head"])["alpha"]
    sep = alpha[alpha["pos"] == CTX - 1].set_index(["layer", "head"])["alpha"]
    for layer, head in zip(heads["layer"], heads["head"]):
        assert cls[(layer, head)] > 3 * sep[(layer, head)]
    # uniform attention would give every key 1/64; the [CLS] heads are far above it
    assert cls.max() > 0.5
    rate = analyze_sinks(store)["rate"].set_index("layer")["sink_rate"]
    assert rate["0"] < 10.0 and rate["all"] > 20.0  # layer 0 attends by content, later layers sink on [CLS]
