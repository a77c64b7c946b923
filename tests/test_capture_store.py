"""Capture into a real store and read it back: the counts, the values and the notebook API."""

from __future__ import annotations

import torch

from workbench import Store
from workbench.capture.runner import CaptureSettings, run_capture
from workbench.models.registry import load_model

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"]


def test_capture_records_exact_tokens_and_matching_activations(tmp_path, tiny_relu):
    report = run_capture(
        CaptureSettings(model="tiny-relu", data="builtin", hooks=HOOKS, tokens=1000, ctx=64, batch_size=4, store=str(tmp_path / "s")),
        handle=tiny_relu,
        progress=False,
    )
    assert report.tokens == 1000 and not report.exhausted
    store = Store.open(tmp_path / "s")
    info = store.info()
    assert info["tokens"] == 1000
    assert info["hooks"]["blocks.1.mlp.hook_post"]["shape"] == [tiny_relu.model.cfg.d_mlp]
    counts = store.sql("SELECT count(*), count(DISTINCT token_index), min(token_index), max(token_index) FROM tokens").fetchall()[0]
    assert counts == (1000, 1000, 0, 999)
    # every window starts with the model's BOS, recorded like any token
    first = store.df("SELECT DISTINCT token_id FROM tokens WHERE pos = 0")
    assert first["token_id"].tolist() == tiny_relu.prefix_ids
    # the stored activations are the model's own, row for row
    tokens = store.tokens(0, 128)
    ids = torch.tensor(tokens["token_id"].values).view(2, 64)
    direct = tiny_relu.run(ids, HOOKS)
    stored = store.activations("blocks.1.mlp.hook_post", 0, 128)
    torch.testing.assert_close(stored, direct["blocks.1.mlp.hook_post"].reshape(128, -1).float())
    # SQL sees the same vectors as the tensor API
    row = store.df("SELECT act FROM act_blocks_0_hook_resid_post WHERE token_index = ?", [77])["act"][0]
    torch.testing.assert_close(torch.tensor(list(row)), store.activations("blocks.0.hook_resid_post", 77, 78)[0])


def test_streaming_chunks_cover_every_row_once(tmp_path, tiny_relu):
    run_capture(
        CaptureSettings(model="tiny-relu", data="builtin", hooks=HOOKS[:1], tokens=700, ctx=50, batch_size=3, store=str(tmp_path / "s")),
        handle=tiny_relu,
        progress=False,
    )
    store = Store.open(tmp_path / "s")
    whole = store.activations(HOOKS[0])
    chunks = list(store.iter_activations(HOOKS[0], chunk_tokens=128))
    assert [len(c) for c in chunks] == [128] * 5 + [60]
    torch.testing.assert_close(torch.cat(chunks), whole)
    torch.testing.assert_close(store.activations(HOOKS[0], 130, 415), whole[130:415])


def test_half_precision_storage_is_exact_in_its_dtype(tmp_path, tiny_relu):
    run_capture(
        CaptureSettings(
            model="tiny-relu", data="builtin", hooks=HOOKS[:1], tokens=256, ctx=64, batch_size=2, store=str(tmp_path / "s"), dtype="float16"
        ),
        handle=tiny_relu,
        progress=False,
    )
    store = Store.open(tmp_path / "s")
    ids = torch.tensor(store.tokens(0, 64)["token_id"].values).view(1, 64)
    direct = tiny_relu.run(ids, HOOKS[:1])[HOOKS[0]][0]
    assert torch.equal(store.activations(HOOKS[0], 0, 64), direct.half().float())


def test_derived_tables_are_replaced_whole(tmp_path, tiny_relu):
    run_capture(
        CaptureSettings(model="tiny-relu", data="builtin", hooks=HOOKS[:1], tokens=64, ctx=64, batch_size=1, store=str(tmp_path / "s")),
        handle=tiny_relu,
        progress=False,
    )
    store = Store.open(tmp_path / "s")
    import pandas as pd

    store.write_table("notes", pd.DataFrame({"x": [1, 2, 3]}))
    store.write_table("notes", pd.DataFrame({"x": [4]}))
    assert store.df("SELECT sum(x) AS s FROM notes")["s"][0] == 4
    assert "notes" in store.info()["tables"]


def test_model_registry_knows_the_zoo():
    handle = load_model("tiny-relu")
    assert handle.kind == "decoder" and handle.n_layers >= 2
