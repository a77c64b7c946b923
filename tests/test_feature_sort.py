"""The feature pass's external sort: spilled, merged runs give exactly the in-memory sort."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from sae.rules import TopKRule
from tests.app_stores import dense_store
from tests.test_app_features import random_sae
from workbench.analysis.feature_sort import RowSorter
from workbench.analysis.features import features_table, run_feature_pass


def in_memory_sort(feature: np.ndarray, value: np.ndarray, token_index: np.ndarray) -> np.ndarray:
    """The order the features table promises: a stable sort by (feature, -value) of rows in token order."""
    by_token = np.lexsort((feature, token_index))
    return by_token[np.lexsort((-value[by_token], feature[by_token]))]


@pytest.mark.parametrize(("run_rows", "fan_in"), [(10**6, 2), (700, 64), (700, 3), (97, 2)])
def test_runs_merge_to_the_stable_sort_with_ties_across_runs(tmp_path, run_rows, fan_in):
    rng = np.random.default_rng(run_rows)
    n = 20_000
    token_index = np.repeat(np.arange(n // 4, dtype=np.int64), 4)
    feature = rng.integers(0, 30, n).astype(np.int32)
    value = (rng.integers(1, 6, n) / 4).astype(np.float32)  # few values: ties within and across runs
    sorter = RowSorter(tmp_path / "scratch", run_rows=run_rows, fan_in=fan_in)
    for lo in range(0, n, 333):
        sorter.add(feature[lo : lo + 333], value[lo : lo + 333], token_index[lo : lo + 333])
    assert sorter.finish(tmp_path / "out.parquet", row_group_size=1000) == n
    got = pq.read_table(tmp_path / "out.parquet")
    order = in_memory_sort(feature, value, token_index)
    np.testing.assert_array_equal(got["feature"].to_numpy(), feature[order])
    np.testing.assert_array_equal(got["value"].to_numpy(), value[order])
    np.testing.assert_array_equal(got["token_index"].to_numpy(), token_index[order])
    meta = pq.ParquetFile(tmp_path / "out.parquet").metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [1000] * 20
    assert not any((tmp_path / "scratch").iterdir())


def test_a_spilled_pass_writes_the_in_memory_sort_of_a_store(tmp_path):
    store = dense_store(tmp_path / "store", tokens=3000)
    folder = random_sae(tmp_path / "sae", TopKRule(5))
    run_feature_pass(store, folder, name="whole")
    run_feature_pass(store, folder, name="spilled", sort_rows=200)  # 75 runs, merged in two rounds
    [whole], [spilled] = (store.views()[features_table(n)] for n in ("whole", "spilled"))
    table, reference = pq.read_table(spilled), pq.read_table(whole)
    assert table.equals(reference) and table.schema == reference.schema and table.num_rows == 15_000
    feature, value, token_index = (table[c].to_numpy() for c in ("feature", "value", "token_index"))
    order = in_memory_sort(feature, value, token_index)
    np.testing.assert_array_equal(order, np.arange(len(order)))
    groups = [pq.ParquetFile(p).metadata.num_row_groups for p in (spilled, whole)]
    assert groups[0] == groups[1]
