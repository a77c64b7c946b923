"""A store from someone else: folder and file names that carry SQL never run it, and a
crafted checkpoint never runs its pickle. What reaches SQL is quoted or skipped."""

from __future__ import annotations

import os
import pickle
import shutil
import warnings

import pytest

from tests.cli_process import run_workbench
from workbench import Store
from workbench.capture.runner import CaptureSettings, run_capture
from workbench.store.reader import sql_identifier

HOOK = "blocks.0.hook_resid_post"
INJECT = "t\" AS SELECT 1; COPY (SELECT 'x') TO '{out}'; CREATE VIEW \"u"


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory, tiny_relu):
    root = tmp_path_factory.mktemp("hostile") / "store"
    run_capture(CaptureSettings(model="tiny-relu", data="builtin", hooks=[HOOK], tokens=256, ctx=64, batch_size=2, store=str(root)),
                handle=tiny_relu, progress=False)  # fmt: skip
    Store.open(root).write_table("legit", __import__("pandas").DataFrame({"x": [1, 2, 3]}))
    return root


def test_identifiers_are_quoted():
    assert sql_identifier('a"b') == '"a""b"'


def test_names_carrying_sql_are_skipped_and_nothing_runs(clean_store, tmp_path, monkeypatch):
    root = tmp_path / "store"
    shutil.copytree(clean_store, root)
    monkeypatch.chdir(tmp_path)
    marks = [tmp_path / f"pwned{i}.csv" for i in range(3)]  # relative names: the cwd is tmp_path
    # a derived-table folder, a batch file stem and a quoted-looking name, each carrying SQL
    (root / "tables" / INJECT.format(out=marks[0].name)).mkdir()
    shutil.copy(next((root / "tables" / "legit").glob("*.parquet")), root / "tables" / INJECT.format(out=marks[0].name) / "part-0.parquet")
    batch = sorted((root / "capture").glob("batch-*"))[0]
    shutil.copy(batch / "tokens.parquet", batch / (INJECT.format(out=marks[1].name) + ".parquet"))
    (root / "tables" / 'x"; COPY (SELECT 1) TO \'pwned2.csv\'; --').mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = Store.open(root)
        views = store.info()["views"]
        assert store.sql("SELECT count(*) FROM tokens").fetchall() == [(256,)]
        assert store.df("SELECT sum(x) AS s FROM legit")["s"][0] == 6
        assert store.sql("SELECT count(*) FROM act_blocks_0_hook_resid_post").fetchall() == [(256,)]
    assert sorted(views) == ["act_blocks_0_hook_resid_post", "legit", "tokens"]
    skipped = " ".join(str(w.message) for w in caught)
    assert "skipping" in skipped and "COPY" in skipped
    assert not any(m.exists() for m in marks) and not list(tmp_path.glob("pwned*"))


def test_a_hostile_saes_table_name_runs_no_sql(clean_store, tmp_path, monkeypatch):
    """The app reads SAE names from the store's saes table and builds table names from them."""
    import pandas as pd

    from workbench.analysis.feature_page import FeatureTables

    root = tmp_path / "store"
    shutil.copytree(clean_store, root)
    monkeypatch.chdir(tmp_path)
    name = "a; COPY (SELECT 1) TO 'pwned.csv'; --"
    store = Store.open(root)
    store.write_table("saes", pd.DataFrame({"name": [name], "folder": ["/nowhere"], "hook": [HOOK]}))
    with pytest.raises(Exception, match="no features for SAE"):
        FeatureTables(store, name)
    with pytest.raises(Exception, match="SQL failed"):
        store.df(f"SELECT * FROM {sql_identifier('feature_stats_' + name)}")
    assert not (tmp_path / "pwned.csv").exists()


class _Payload:
    """Unpickling this would create the marker file (what a hostile checkpoint does)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_checkpoint_is_refused_without_running(clean_store, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "ran"
    with open(out / "checkpoint.pt", "wb") as handle:
        pickle.dump({"config": _Payload(str(marker))}, handle)
    done = run_workbench("train", "--store", str(clean_store), "--hook", HOOK, "--d-sae", "64", "--k", "4",
                         "--tokens", "256", "--batch-size", "64", "--out", str(out), "--resume", "--no-progress")  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: cannot resume: ") and "not a checkpoint" in done.stderr
    assert not marker.exists()
