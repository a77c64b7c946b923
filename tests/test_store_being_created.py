"""A store a capture is still creating reads as an empty store (zero rows, its views with
their columns), and what killed writers left behind is removed by the next writer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pandas as pd
import pytest

from tests.cli_process import start_workbench
from workbench import Store
from workbench.errors import WorkbenchError
from workbench.store.layout import temporary_name, write_manifest

TOKEN_COLUMNS = ["token_index", "seq", "pos", "doc", "token_id", "token"]
MANIFEST = {"format": 1, "model": {"name": "tiny-relu"}, "hooks": {"blocks.0.hook_resid_post": {"shape": [64], "dtype": "float16"}},
            "capture": {"tokens": 10}}  # fmt: skip


def _columns(store: Store, view: str) -> list[tuple[str, str]]:
    return [(row[0], row[1]) for row in store.sql(f'DESCRIBE "{view}"').fetchall()]


@pytest.mark.parametrize("leftovers", [[], [".write-test-123"], [".tmp-123-abc"], ["capture/", "capture/.tmp-1-batch-000000-ab/"]])
def test_a_folder_a_capture_is_starting_in_reads_as_empty(leftovers, tmp_path):
    for name in leftovers:
        (tmp_path / name).mkdir() if name.endswith("/") else (tmp_path / name).write_text("")
    store = Store.open(tmp_path)
    assert store.n_tokens() == 0 and store.info()["views"] == ["tokens"]
    assert store.sql("SELECT count(*) FROM tokens").fetchall() == [(0,)]
    assert [c for c, _ in _columns(store, "tokens")] == TOKEN_COLUMNS
    assert list(store.tokens().columns) == TOKEN_COLUMNS


def test_a_manifest_without_a_batch_has_its_views_typed(tmp_path):
    write_manifest(tmp_path, MANIFEST)
    store = Store.open(tmp_path)
    assert store.info()["views"] == ["act_blocks_0_hook_resid_post", "tokens"]
    assert _columns(store, "act_blocks_0_hook_resid_post") == [("token_index", "BIGINT"), ("act", "SMALLINT[64]")]
    assert store.df("SELECT * FROM act_blocks_0_hook_resid_post JOIN tokens USING (token_index)").empty


def test_a_folder_with_other_files_is_still_not_a_store(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(WorkbenchError, match="is not a workbench store"):
        Store.open(tmp_path)


def test_a_notebook_polling_from_the_start_never_gets_an_exception(tmp_path):
    root = tmp_path / "store"
    proc = start_workbench("capture", "--model", "tiny-relu", "--data", "builtin", "--hooks", "blocks.0.hook_resid_post",
                           "--tokens", "2000", "--ctx", "64", "--batch-size", "2", "--store", str(root), log=tmp_path / "log")  # fmt: skip
    seen = []
    deadline = time.time() + 120
    while proc.poll() is None or not seen or seen[-1] < 2000:
        if root.exists():
            store = Store.open(root)
            seen.append(store.sql("SELECT count(*) FROM tokens").fetchall()[0][0])
        assert time.time() < deadline, "the capture did not finish"
        if proc.poll() is not None and proc.returncode != 0:
            raise AssertionError((tmp_path / "log").read_text())
        time.sleep(0.01)
    assert seen[0] < 2000 and seen[-1] == 2000 and seen == sorted(seen)


def test_the_next_writer_removes_what_killed_writers_left(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    tables = tmp_path / "tables"
    tables.mkdir()
    # an old copy renamed aside whose replacement did land (the writer died before deleting it)
    stale = [tables / f".tmp-{dead_pid}-features_x-0123abcd", tables / f".old-{dead_pid}-saes-0123abcd", tables / ".tmp-saes-0123abcd"]
    live = tables / temporary_name("other")  # this process is alive: another writer's work in progress
    for folder in (*stale, live, tables / "saes"):
        folder.mkdir()
        (folder / "part-0.parquet").write_bytes(b"partial")
    write_manifest(tmp_path, MANIFEST)
    Store.open(tmp_path).write_table("t", pd.DataFrame({"x": [1]}))
    assert not any(p.exists() for p in stale) and live.exists()
    assert sorted(p.name for p in tables.iterdir()) == sorted([live.name, "saes", "t"])
    assert json.loads((tmp_path / "store.json").read_text())["model"]["name"] == "tiny-relu"
    assert os.getpid() != dead_pid
