"""Inputs that used to end in a traceback or a silent wrong result: each gets one line on
stderr, exit code 2, and leaves every file as it was (a fresh --store is not even created)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from sae.config import TrainConfig
from sae.trainer import Trainer
from tests.test_capture_bad_input import _snapshot
from tests.test_sae_store import cli
from workbench import Store
from workbench.capture.runner import CaptureSettings, run_capture
from workbench.store.encoding import encode_activations
from workbench.training_data import StoreSource

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HOOK, OTHER = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"  # the same width
CAPTURE = ["capture", "--model", "tiny-relu", "--data", "builtin", "--hooks", HOOK, "--tokens", "256", "--batch-size", "2"]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_relu) -> Store:
    root = tmp_path_factory.mktemp("refusals") / "store"
    run_capture(CaptureSettings(model="tiny-relu", data="builtin", hooks=[HOOK, OTHER], tokens=1024, ctx=64, batch_size=4, store=str(root)),
                handle=tiny_relu, progress=False)  # fmt: skip
    return Store.open(root)


@pytest.fixture(scope="module")
def sae(store, tmp_path_factory) -> Path:
    source = StoreSource(store, HOOK, chunk_tokens=512)
    config = TrainConfig(arch="topk", d_in=source.d_in, d_sae=32, k=4, tokens=512, batch_size=128, init_tokens=256)
    trainer = Trainer.start(config, source)
    trainer.fit(progress=False)
    return trainer.save_sae(tmp_path_factory.mktemp("sae") / "sae")


def refused(monkeypatch, capsys, *args: str) -> str:
    code, err = cli(monkeypatch, capsys, *args)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), (code, err)
    return err


@pytest.mark.parametrize("ctx", ["100000", "257"])
def test_a_ctx_beyond_the_model_is_refused_before_anything_is_written(ctx, tmp_path, monkeypatch, capsys):
    err = refused(monkeypatch, capsys, *CAPTURE, "--ctx", ctx, "--store", str(tmp_path / "s"))
    assert f"--ctx {ctx} is longer than the context of model tiny-relu (256 tokens" in err
    assert not (tmp_path / "s").exists()
    code, err = cli(monkeypatch, capsys, *CAPTURE, "--ctx", "64", "--store", str(tmp_path / "s"))  # the corrected command
    assert code == 0 and Store.open(tmp_path / "s").n_tokens() == 256


@no_cuda
def test_cuda_on_a_machine_without_it(store, sae, tmp_path, monkeypatch, capsys):
    before = _snapshot(store.root)
    for args in (
        [*CAPTURE, "--ctx", "64", "--store", str(tmp_path / "s"), "--device", "cuda"],
        ["eval", str(sae), "--store", str(store.root), "--device", "cuda"],
        ["features", str(sae), "--store", str(store.root), "--device", "cuda"],
    ):
        assert "no CUDA device is visible" in refused(monkeypatch, capsys, *args)
    assert not (tmp_path / "s").exists() and _snapshot(store.root) == before


def test_train_out_naming_a_file(store, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("mine")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        err = refused(monkeypatch, capsys, "train", "--store", str(store.root), "--hook", HOOK, "--d-sae", "32", "--k", "4",
                      "--tokens", "256", "--batch-size", "128", "--out", str(out), "--no-progress")  # fmt: skip
        assert "is a file" in err
    assert (tmp_path / "file").read_text() == "mine"


def _broken_saes(sae: Path, tmp: Path) -> dict[str, Path]:
    weights = load_file(str(sae / "sae_weights.safetensors"))
    folders = {}
    for name, change in {
        "W_enc has shape": lambda w: {**w, "W_enc": w["W_enc"][:, :-3].contiguous()},
        "lacks W_dec": lambda w: {k: v for k, v in w.items() if k != "W_dec"},
    }.items():
        folders[name] = tmp / name.replace(" ", "_")
        shutil.copytree(sae, folders[name])
        save_file(change(weights), str(folders[name] / "sae_weights.safetensors"))
    folders["not a readable safetensors file"] = tmp / "truncated"
    shutil.copytree(sae, tmp / "truncated")
    data = (sae / "sae_weights.safetensors").read_bytes()
    (tmp / "truncated" / "sae_weights.safetensors").write_bytes(data[: len(data) // 2])
    return folders


def test_broken_sae_folders(store, sae, tmp_path, monkeypatch, capsys):
    before = _snapshot(store.root)
    for expected, folder in _broken_saes(sae, tmp_path).items():
        for command in ("eval", "features"):
            assert expected in refused(monkeypatch, capsys, command, str(folder), "--store", str(store.root)), (command, folder)
    assert _snapshot(store.root) == before


def test_nan_in_the_store_is_refused_by_eval_and_features(store, sae, tmp_path, monkeypatch, capsys):
    broken = tmp_path / "store"
    shutil.copytree(store.root, broken)
    path = sorted((broken / "capture").glob("batch-*"))[2] / f"act.{HOOK}.parquet"
    rows = pq.ParquetFile(path).metadata.num_rows
    acts = store.activations(HOOK, 2 * rows, 3 * rows)
    acts[5, 1] = float("nan")
    table = pq.read_table(path)
    table = table.set_column(table.schema.get_field_index("act"), "act", pa.chunked_array([encode_activations(acts, "float32")]))
    pq.write_table(table, path)
    before = _snapshot(broken)
    for command in ("eval", "features"):
        err = refused(monkeypatch, capsys, command, str(sae), "--store", str(broken))
        assert f"NaN or Inf) in {HOOK} (first at token_index {2 * rows + 5})" in err
    assert _snapshot(broken) == before


def test_features_on_another_hook_of_the_same_width(store, sae, monkeypatch, capsys):
    before = _snapshot(store.root)
    err = refused(monkeypatch, capsys, "features", str(sae), "--store", str(store.root), "--hook", OTHER)
    assert f"--hook {OTHER} is not the hook SAE" in err and f"trained on ({HOOK})" in err
    assert _snapshot(store.root) == before
    code, _ = cli(monkeypatch, capsys, "features", str(sae), "--store", str(store.root), "--hook", HOOK)
    assert code == 0


def test_an_unknown_flag_is_clicks_usage_message_not_a_traceback(tmp_path, monkeypatch, capsys):
    code, err = cli(monkeypatch, capsys, *CAPTURE, "--store", str(tmp_path / "s"), "--no-such-flag")
    assert code == 2 and "No such option: --no-such-flag" in err and "Traceback" not in err, err
    assert not (tmp_path / "s").exists()
