"""The built-in zoo: corpus split, shipped weights that actually model Python, training and loading."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from workbench.commands.zoo import zoo_app
from workbench.errors import WorkbenchError
from workbench.models.corpus import builtin_documents, corpus_files, is_heldout
from workbench.models.registry import load_model
from workbench.models.zoo import TOKENIZER_FILE, ZOO, is_shipped, load_zoo_model, load_zoo_tokenizer, zoo_dir
from workbench.models.zoo_training import (
    encode_documents,
    heldout_loss,
    heldout_windows,
    next_token_nll,
    phenomena_snapshot,
    save_zoo_model,
    train_model,
    unigram_entropy,
)


@pytest.fixture(scope="module")
def heldout_docs() -> list[str]:
    return builtin_documents("heldout")


@pytest.fixture(scope="module", params=sorted(ZOO))
def handle(request: pytest.FixtureRequest):
    return load_model(request.param)


def test_corpus_split_is_disjoint_deterministic_and_stdlib_only() -> None:
    train, heldout = corpus_files("train"), corpus_files("heldout")
    assert train == sorted(train) and heldout == sorted(heldout)
    assert not set(train) & set(heldout)
    assert 0.005 < len(heldout) / (len(train) + len(heldout)) < 0.06
    assert not any("site-packages" in p.parts for p in train + heldout)
    assert is_heldout("json/decoder.py") == is_heldout("json/decoder.py")
    assert corpus_files("heldout") == heldout


def test_unknown_split_is_a_clear_error() -> None:
    with pytest.raises(WorkbenchError, match="unknown corpus split"):
        builtin_documents("validation")


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_weights_are_shipped_small_and_fp16(name: str) -> None:
    folder = zoo_dir(name)
    assert is_shipped(name), f"data/zoo/{name} lacks weights; run `workbench zoo train {name}`"
    assert (folder / "model.safetensors").stat().st_size < 9 * 2**20
    record = json.loads((folder / "training.json").read_text())
    assert record["tokens_seen"] > 0 and record["heldout_loss"] < record["heldout_unigram_entropy"]


def test_handle_describes_the_model(handle) -> None:
    spec = ZOO[handle.name]
    assert handle.kind == "decoder"
    assert handle.prefix_ids == [handle.tokenizer.bos_token_id] == [0]
    assert (handle.n_layers, handle.d_model) == (spec.n_layers, spec.d_model)
    assert len(handle.fingerprint) == 16
    assert handle.model.cfg.n_ctx == spec.n_ctx
    assert handle.token_strings(handle.tokenize("def f(x):\n    return x"))[0] == "def"
    expected = "blocks.3.mlp.hook_expert_indices" if spec.num_experts else "blocks.3.mlp.hook_post"
    assert expected in handle.hook_names()


def test_shipped_model_beats_the_unigram_baseline_by_far(handle, heldout_docs) -> None:
    """Held-out loss on a small slice is at most 0.6x the unigram entropy of the held-out tokens."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(zoo_dir(handle.name) / TOKENIZER_FILE))
    stream = encode_documents(tokenizer, heldout_docs)
    windows = heldout_windows(stream, handle.model.cfg.n_ctx, handle.prefix_ids[0])
    baseline = unigram_entropy(windows[:, 1:])
    loss = heldout_loss(handle.model, windows[:12])
    assert baseline > 5.0
    assert loss <= 0.6 * baseline, f"{handle.name}: held-out loss {loss:.3f} vs unigram {baseline:.3f}"


def test_missing_weights_say_how_to_make_them(tmp_path) -> None:
    with pytest.raises(WorkbenchError, match="workbench zoo train tiny-relu"):
        load_zoo_model("tiny-relu", folder=tmp_path)


def test_zoo_list_shows_every_model() -> None:
    result = CliRunner().invoke(zoo_app, ["list"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for name in ZOO:
        assert name in result.output


def test_train_unknown_model_is_rejected() -> None:
    result = CliRunner().invoke(zoo_app, ["train", "tiny-gpt9"])
    assert isinstance(result.exception, WorkbenchError)
    assert "tiny-relu" in str(result.exception)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_training_lowers_loss_and_round_trips(name: str, tmp_path, heldout_docs) -> None:
    """A few steps of the real loop on a shrunken spec; the saved folder loads to the same logits."""
    from tokenizers import Tokenizer

    tokenizer_path = zoo_dir(name) / TOKENIZER_FILE
    stream = encode_documents(Tokenizer.from_file(str(tokenizer_path)), heldout_docs[:6])
    spec = dataclasses.replace(ZOO[name], n_layers=1, d_model=32, n_heads=2, d_mlp=64, n_ctx=32,
                               batch_size=8, lr=1e-2, warmup_steps=2)
    windows = heldout_windows(stream, spec.n_ctx, 0, max_windows=16)
    model, record = train_model(spec, stream, windows, "cpu", steps=30, tokenizer=load_zoo_tokenizer(tokenizer_path), progress=False)
    assert record["steps"] == 30 and record["tokens_seen"] == 30 * 8 * 32
    first, last = record["curve"][0], record["curve"][-1]
    assert last["heldout_loss"] < np.log(len(model.tokenizer)) - 1.0, record["curve"]
    assert first["step"] < last["step"]
    snapshot = phenomena_snapshot(model, windows)
    assert 0.0 <= snapshot["sink_rate_eps_0.3"] <= 100.0
    assert len(snapshot["alpha_1_mean"]) == 1 and len(snapshot["alpha_1_mean"][0]) == 2
    if spec.num_experts:
        assert 0.0 < snapshot["expert_load_entropy_per_layer"][0] <= 1.0
    else:
        assert 0.0 < snapshot["mlp_active_percent_per_layer"][0] < 100.0

    record.update(device="cpu", recipe=spec.recipe(), corpus={"python": "test"}, heldout_loss=1.0,
                  heldout_unigram_entropy=2.0, phenomena=snapshot)
    save_zoo_model(model, spec, tokenizer_path, record, tmp_path)
    loaded = load_zoo_model(name, folder=tmp_path)
    with torch.no_grad():
        expected = next_token_nll(model, windows[:2])
        got = next_token_nll(loaded.model, windows[:2])
    assert torch.allclose(expected, got, atol=0.05)  # fp16 weights on disk
