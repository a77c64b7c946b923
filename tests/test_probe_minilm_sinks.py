"""The real all-MiniLM-L6-v2 (packaged weights) over ordinary English: where do its heads put their mass?

Measured (ctx 64, 7 paragraphs of English below, all queries): many heads of layers 1-4
give [CLS] (position 0) alpha above 0.3; [SEP] (the window's last position) receives little
(alpha <= ~0.1 in every head). See BENCHMARKS.md, "Phenomena".
"""

from __future__ import annotations

from tests.phenomena_models import ENGLISH
from workbench import Store
from workbench.analysis.attention_sinks import analyze_sinks, key_importance, sink_heads
from workbench.capture.runner import CaptureSettings, run_capture
from workbench.models.registry import load_model

CTX = 64


def test_minilm_sink_heads_sit_on_cls(tmp_path):
    handle = load_model("minilm")
    assert handle.kind == "encoder"
    (tmp_path / "text.txt").write_text(ENGLISH)
    run_capture(
        CaptureSettings(model=handle.name, data=str(tmp_path / "text.txt"), hooks=[], tokens=640, ctx=CTX, batch_size=4,
                        store=str(tmp_path / "s"), probes=["sinks"]),
        handle=handle, progress=False,
    )  # fmt: skip
    store = Store.open(tmp_path / "s")
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
