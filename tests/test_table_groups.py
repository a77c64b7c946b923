"""Table groups: a feature pass killed at each step of its publication leaves the old SAE's
tables or the new SAE's, never a mix, and the rerun completes and leaves nothing behind; a
unit that raises publishes nothing; a hostile manifest names no file outside its group."""

from __future__ import annotations

import json
import signal

import pandas as pd
import pytest

from sae.rules import TopKRule
from tests.app_stores import dense_store
from tests.cli_process import run_workbench
from tests.test_app_features import random_sae
from workbench import Store
from workbench.analysis.features import FEATURES_GROUP, run_feature_pass
from workbench.errors import WorkbenchError
from workbench.store.table_group import STAGING_PREFIX, TableUnit

#: The steps of a pass, in order; a kill at any before "group-published" must leave the old set.
STEPS = ["rows-spilled", "group-member-features_s", "group-member-feature_stats_s", "group-member-feature_corr_s", "group-member-saes",
         "group-renamed", "group-published"]


def feature_set(store: Store) -> int:
    """d_sae of the SAE 's' whose tables the store shows, after checking they all belong to one pass."""
    sae = store.df("SELECT d_sae, rows FROM saes WHERE name = 's'").iloc[0]
    stats = store.df("SELECT count(*) AS n, sum(count) AS fired FROM feature_stats_s").iloc[0]
    rows = store.df("SELECT count(*) AS n, max(feature) AS top FROM features_s").iloc[0]
    corr = store.df("SELECT max(greatest(feature, other)) AS top FROM feature_corr_s").iloc[0]
    assert stats["n"] == sae["d_sae"] and stats["fired"] == rows["n"] == sae["rows"]
    assert rows["top"] < sae["d_sae"] and corr["top"] < sae["d_sae"]
    return int(sae["d_sae"])


def test_a_killed_rerun_never_mixes_two_passes_and_the_next_run_completes(tmp_path):
    store = dense_store(tmp_path / "store", tokens=2000)
    run_feature_pass(store, random_sae(tmp_path / "old", TopKRule(3), d_sae=32), name="s")
    run_feature_pass(store, random_sae(tmp_path / "other", TopKRule(2), d_sae=16), name="other")
    other = store.df("SELECT * FROM features_other")
    new = random_sae(tmp_path / "new", TopKRule(5), d_sae=64, seed=1)
    args = ("features", str(new), "--store", str(store.root), "--name", "s", "--sort-rows", "1000")
    for step in STEPS:
        done = run_workbench(*args, env={"WORKBENCH_CRASH_AT": step})
        assert done.returncode == -signal.SIGKILL, (step, done.stderr)
        assert feature_set(store) == (64 if step == "group-published" else 32), step
        assert set(store.df("SELECT name FROM saes")["name"]) == {"s", "other"}
    done = run_workbench(*args)
    assert done.returncode == 0, done.stderr
    assert feature_set(store) == 64
    pd.testing.assert_frame_equal(store.df("SELECT * FROM features_other"), other)
    group = store.root / "tables" / FEATURES_GROUP
    assert not list(group.glob(f"{STAGING_PREFIX}*"))  # the killed runs' staging and spilled rows are gone
    named = {f for files in json.loads((group / "current").read_text())["tables"].values() for f in files}
    on_disk = {str(p.relative_to(group)) for p in group.glob("*/*")}
    assert on_disk == named  # and so is every file no manifest names


def test_a_unit_that_raises_publishes_nothing(tmp_path):
    store = dense_store(tmp_path / "store", tokens=500)
    run_feature_pass(store, random_sae(tmp_path / "old", TopKRule(3), d_sae=32), name="s")
    before = store.views()
    with pytest.raises(RuntimeError), TableUnit(store.root, FEATURES_GROUP) as unit:
        unit.write_table("feature_stats_s", pd.DataFrame({"feature": [0]}))
        raise RuntimeError("the pass failed half way")
    assert store.views() == before and feature_set(store) == 32
    assert not list((store.root / "tables" / FEATURES_GROUP).glob(f"{STAGING_PREFIX}*"))
    with pytest.raises(WorkbenchError, match="is a table group"):  # a plain table of its name would replace the group
        store.write_table(FEATURES_GROUP, pd.DataFrame({"x": [1]}))
    assert store.views() == before


def test_a_pass_that_fails_while_encoding_leaves_nothing(tmp_path):
    store = dense_store(tmp_path / "store", tokens=500)
    run_feature_pass(store, random_sae(tmp_path / "old", TopKRule(3), d_sae=32), name="s")
    group = store.root / "tables" / FEATURES_GROUP
    before = sorted(p.relative_to(group) for p in group.rglob("*"))
    with pytest.raises(WorkbenchError, match="chunk_tokens must be positive"):  # raised by the first read, after the unit opened
        run_feature_pass(store, random_sae(tmp_path / "new", TopKRule(5), d_sae=64), name="s", chunk_tokens=0)
    assert sorted(p.relative_to(group) for p in group.rglob("*")) == before and feature_set(store) == 32


def test_a_hostile_manifest_is_skipped_member_by_member(tmp_path):
    store = dense_store(tmp_path / "store", tokens=500)
    run_feature_pass(store, random_sae(tmp_path / "old", TopKRule(3), d_sae=32), name="s")
    manifest = store.root / "tables" / FEATURES_GROUP / "current"
    tables = json.loads(manifest.read_text())["tables"]
    tables["escape"] = ["../../../outside.parquet"]
    tables['t" AS SELECT 1; --'] = tables["saes"]
    manifest.write_text(json.dumps({"tables": tables}))
    with pytest.warns(UserWarning, match="skipping member"):
        views = store.views()
    assert "escape" not in views and not any('"' in name for name in views)
    assert feature_set(store) == 32
    manifest.write_text("{not json")
    with pytest.warns(UserWarning, match="manifest is unreadable"):
        assert "saes" not in store.views()
