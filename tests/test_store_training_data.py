"""The data path from a store to the trainer: the file reader against the stored values,
resident and streamed delivery giving the same batches, 16-bit stores read as stored and
trained on, passes over the data reported, training with no store, and a checkpoint that
cannot be written leaving the last one intact."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.cli_process import run_workbench
from tests.phenomena_models import dense_config, handle_for
from workbench.store.activation_files import fill_rows
from workbench.store.layout import ACT_PREFIX
from workbench.training_data import StoreSource

HOOK = "blocks.1.hook_resid_post"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def stored_values(store, hook: str, dtype: str) -> torch.Tensor:
    """The hook's vectors decoded independently of the reader: Parquet -> Python lists."""
    rows = []
    for batch in sorted((store.root / "capture").glob("batch-*")):
        rows += pq.read_table(batch / f"{ACT_PREFIX}{hook}.parquet").column("act").to_pylist()
    if dtype == "float32":
        return torch.tensor(rows, dtype=torch.float32)
    return torch.tensor(rows, dtype=torch.int16).view(torch.bfloat16 if dtype == "bfloat16" else torch.float16)


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def store(request, tmp_path_factory):
    from workbench.capture.runner import CaptureSettings, run_capture
    from workbench.store.reader import Store

    folder = tmp_path_factory.mktemp(f"store-{request.param}")
    handle = handle_for(dense_config())
    (folder / "text.txt").write_text("the cat sat on the mat and the dog ran to the park " * 200)
    run_capture(CaptureSettings(model=handle.name, data=str(folder / "text.txt"), hooks=[HOOK], tokens=2000, ctx=48,
                                batch_size=4, store=str(folder / "store"), dtype=request.param), handle=handle, progress=False)
    return Store.open(folder / "store")


def test_reader_returns_the_stored_values_at_any_range(store):
    dtype = store.hooks[HOOK]["dtype"]
    truth = stored_values(store, HOOK, dtype)
    assert truth.shape[0] == store.n_tokens() == 2000
    full = store.activations(HOOK)
    assert full.dtype == torch.float32 and torch.equal(full, truth.float())
    assert torch.equal(store.activations(HOOK, 190, 1234), truth[190:1234].float())  # crosses batch files
    chunks = list(store.iter_activations(HOOK, chunk_tokens=333, start=5, stop=1999))
    assert [len(c) for c in chunks[:-1]] == [333] * (len(chunks) - 1)
    assert torch.equal(torch.cat(chunks), truth[5:1999].float())
    as_stored = torch.cat(list(store.iter_activations(HOOK, chunk_tokens=700, dtype=truth.dtype)))
    assert as_stored.dtype == truth.dtype and torch.equal(as_stored.view(torch.int16 if dtype != "float32" else torch.float32),
                                                          truth.view(torch.int16 if dtype != "float32" else torch.float32))


def test_reader_refuses_a_file_of_the_wrong_width(store, tmp_path):
    from workbench.errors import WorkbenchError

    files = store.activation_files(HOOK)
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"act": pa.FixedSizeListArray.from_arrays(pa.array([0.0] * (files[0].rows * 3), pa.float32()), 3)}), bad)
    wrong = [type(files[0])(bad, 0, files[0].rows)]
    with pytest.raises(WorkbenchError, match="width 3"):
        fill_rows(wrong, "float32", 32, 0, 4, torch.empty(4, 32))


def test_resident_and_streamed_sources_give_the_same_batches(store):
    def batches(resident: bool, start: int = 0, n: int = 12) -> list[torch.Tensor]:
        source = StoreSource(store, HOOK, chunk_tokens=300, buffer_chunks=2, seed=4, resident=resident)
        assert source.loader.resident is resident
        it = source.batches(256, start)
        return [next(it) for _ in range(n)]

    resident, streamed = batches(True), batches(False)
    for a, b in zip(resident, streamed):
        assert a.dtype == torch.float32 or a.dtype == torch.bfloat16
        assert torch.equal(a.float(), b.float())
    # resume from batch 5 is the same stream from there on, in both modes
    for later in (batches(True, 5, 7), batches(False, 5, 7)):
        assert all(torch.equal(a.float(), b.float()) for a, b in zip(resident[5:], later))
    # an epoch (2000 tokens) holds every stored row once
    epoch = torch.cat(batches(False, 0, 8))[:2000].float()
    rows, counts = torch.unique(epoch, dim=0, return_counts=True)
    true_rows, true_counts = torch.unique(store.activations(HOOK), dim=0, return_counts=True)
    assert torch.equal(rows, true_rows) and torch.equal(counts, true_counts)


def test_cli_trains_from_the_store_and_reports_passes(store, tmp_path):
    out = tmp_path / "run"
    done = run_workbench("train", "--store", str(store.root), "--hook", HOOK, "--d-sae", "64", "--k", "4", "--tokens", "6144",
                         "--batch-size", "512", "--out", str(out), "--no-progress", "--chunk-tokens", "500")
    assert done.returncode == 0, done.stderr
    # the default split holds out the last 3 of the 42 windows (ctx 48): 1,872 tokens train
    assert "3.3 passes over the 1,872 tokens" in done.stdout
    record = json.loads((out / "training.json").read_text())
    assert record["passes"] == pytest.approx(6144 / 1872)
    assert record["data"]["stored_dtype"] == store.hooks[HOOK]["dtype"]
    assert record["history"][-1]["passes"] == pytest.approx(6144 / 1872)
    assert record["history"][-1]["elapsed_s"] > 0
    assert (out / "sae_weights.safetensors").is_file()


def test_train_with_no_store_runs_the_model_and_resumes(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("def add(a, b):\n    return a + b\n\nclass Point:\n    x: int\n    y: int\n" * 400)
    run = ["--hook", HOOK, "--d-sae", "256", "--k", "8", "--tokens", "8192", "--batch-size", "512", "--no-progress"]
    done = run_workbench("train", "--model", "tiny-relu", "--data", str(text), "--ctx", "64", "--out", str(tmp_path / "run"), *run)
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "run" / "training.json").read_text())
    assert record["data"]["source"] == "live-model" and record["finished"]
    assert record["data"]["tokens"] == 8192
    assert (tmp_path / "run" / "sae_weights.safetensors").is_file()
    both = run_workbench("train", "--model", "tiny-relu", "--store", str(tmp_path), "--out", str(tmp_path / "x"), *run)
    assert both.returncode == 2 and "not both" in both.stderr and "Traceback" not in both.stderr


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_keeps_the_last(store, tmp_path):
    out = tmp_path / "run"
    shape = ["train", "--store", str(store.root), "--hook", HOOK, "--d-sae", "64", "--k", "4", "--batch-size", "512",
             "--out", str(out), "--no-progress"]
    assert run_workbench(*shape, "--tokens", "4096").returncode == 0
    before = (out / "checkpoint.pt").read_bytes()
    (out / ".checkpoint.pt.tmp").mkdir()  # the next write of the checkpoint fails (a folder is in its way)
    again = run_workbench(*shape, "--tokens", "8192", "--resume")
    assert again.returncode == 2, again.stderr
    line = again.stderr.strip().splitlines()[-1]
    assert line.startswith("error: cannot write the checkpoint") and "intact" in line and "Traceback" not in again.stderr
    assert (out / "checkpoint.pt").read_bytes() == before


def test_capture_stores_a_bf16_model_at_two_bytes_by_default():
    from workbench.capture.runner import storage_dtype_for

    handle = handle_for(dense_config())
    assert storage_dtype_for(handle) == "float32"
    handle.model.to(torch.bfloat16)
    assert storage_dtype_for(handle) == "bfloat16"


def test_a_killed_table_replacement_is_restored_by_the_next_writer(store):
    """A writer killed after renaming a table aside and before renaming the new one in."""
    import pandas as pd

    from workbench.store.layout import tables_dir

    store.write_table("kept", pd.DataFrame({"x": [1, 2, 3]}))
    folder = tables_dir(store.root)
    dead_pid = 2**22 + 12345  # above any pid this machine hands out
    (folder / "kept").rename(folder / f".old-{dead_pid}-kept-0badf00d")
    assert "kept" not in store.views()
    store.write_table("other", pd.DataFrame({"y": [4]}))
    assert store.df("SELECT sum(x) AS s FROM kept")["s"][0] == 6
    assert not any(p.name.startswith(".old-") for p in folder.iterdir())
