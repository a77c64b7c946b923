"""The feature pass's rows in the features table's order, in bounded memory: an external sort.

A pass over a large store yields more (feature, value, token_index) rows than memory holds
(tokens x k). RowSorter keeps at most `run_rows` of them: a full buffer is sorted and spilled
to a Parquet run in a scratch folder, and finish() merges the runs, at most `fan_in` at a
time, reading each run one small row group at a time. Peak memory is about run_rows plus
fan_in row groups, whatever the number of tokens.

The order is the features table's: feature ascending, then value descending, then
token_index ascending, which is exactly what one stable in-memory sort by (feature, -value)
of the rows in token order gives. Values are the positive activations the pass keeps, so
their float32 bit patterns order like the values, and (feature, value) packs into one
unsigned 64-bit key.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from workbench.store.crash import crash_point

ROW_SCHEMA = pa.schema([("feature", pa.int32()), ("value", pa.float32()), ("token_index", pa.int64())])
#: Rows sorted in memory before a run is spilled (16 bytes a row).
RUN_ROWS = 2**21
#: Runs merged at once; more runs are merged in rounds.
FAN_IN = 32
#: Rows per row group of a spilled run: what the merge holds of each run.
RUN_GROUP = 2**14


def _keys(feature: np.ndarray, value: np.ndarray) -> np.ndarray:
    """uint64 keys ordering rows by feature, then value descending (values > 0)."""
    bits = value.astype(np.float32).view(np.uint32)
    return (feature.astype(np.uint64) << np.uint64(32)) | (np.uint32(0xFFFFFFFF) - bits).astype(np.uint64)


class _Rows:
    """A run's rows not yet merged: sorted keys and the columns."""

    def __init__(self, table: pa.Table | pa.RecordBatch) -> None:
        self.feature = table.column("feature").to_numpy()
        self.value = table.column("value").to_numpy()
        self.token = table.column("token_index").to_numpy()
        self.key = _keys(self.feature, self.value)

    def __len__(self) -> int:
        return len(self.key)

    def count_upto(self, key: np.uint64, token: np.int64) -> int:
        """How many leading rows order at or before (key, token)."""
        lo, hi = np.searchsorted(self.key, key, "left"), np.searchsorted(self.key, key, "right")
        return int(lo + np.searchsorted(self.token[lo:hi], token, "right"))

    def take(self, n: int) -> tuple[np.ndarray, ...]:
        """Remove and return the first n rows (key, feature, value, token)."""
        head = (self.key[:n], self.feature[:n], self.value[:n], self.token[:n])
        self.key, self.feature, self.value, self.token = self.key[n:], self.feature[n:], self.value[n:], self.token[n:]
        return head


class _GroupedWriter:
    """A Parquet file written in row groups of exactly `group_rows` (the last one shorter)."""

    def __init__(self, path: Path, group_rows: int, compression: str) -> None:
        self.writer = pq.ParquetWriter(path, ROW_SCHEMA, compression=compression)
        self.group_rows = group_rows
        self.pending: list[pa.Table] = []
        self.held = 0
        self.rows = 0

    def write(self, feature: np.ndarray, value: np.ndarray, token: np.ndarray) -> None:
        self.pending.append(pa.table([feature, value, token], schema=ROW_SCHEMA))
        self.held += len(feature)
        self.rows += len(feature)
        if self.held >= self.group_rows:
            joined = pa.concat_tables(self.pending)
            whole = self.held - self.held % self.group_rows
            self.writer.write_table(joined.slice(0, whole), row_group_size=self.group_rows)
            self.pending, self.held = [joined.slice(whole)], self.held - whole

    def close(self) -> int:
        if self.held:
            self.writer.write_table(pa.concat_tables(self.pending), row_group_size=self.group_rows)
        self.writer.close()
        return self.rows


def _row_groups(path: Path) -> Iterator[pa.Table]:
    """A run's row groups, read one at a time (nothing read ahead)."""
    run = pq.ParquetFile(path)
    for i in range(run.num_row_groups):
        yield run.read_row_group(i, use_threads=False)


def _merge(runs: list[Path], out: _GroupedWriter) -> None:
    """k-way merge of sorted runs: each round emits, sorted, every held row that orders at or
    before the smallest last held row of the runs that still have rows on disk."""
    batches = [_row_groups(run) for run in runs]
    held: list[_Rows | None] = [None] * len(runs)
    on_disk = [True] * len(runs)
    while True:
        for i, rows in enumerate(held):
            if (rows is None or not len(rows)) and on_disk[i]:
                batch = next(batches[i], None)
                held[i] = None if batch is None else _Rows(batch)
                on_disk[i] = batch is not None
        live = [rows for rows in held if rows is not None and len(rows)]
        if not live:
            return
        bounds = [(rows.key[-1], rows.token[-1]) for rows, more in zip(held, on_disk) if more and rows is not None and len(rows)]
        key, token = min(bounds) if bounds else (None, None)
        parts = [rows.take(len(rows) if key is None else rows.count_upto(key, token)) for rows in live]
        keys, feature, value, tokens = (np.concatenate([p[c] for p in parts]) for c in range(4))
        order = np.lexsort((tokens, keys))
        out.write(feature[order], value[order], tokens[order])


class RowSorter:
    """Collects feature rows (any order, in pieces) and writes them sorted to one Parquet file."""

    def __init__(self, scratch: Path, run_rows: int = RUN_ROWS, fan_in: int = FAN_IN) -> None:
        if run_rows <= 0 or fan_in < 2:
            raise ValueError("run_rows must be positive and fan_in at least 2")
        self.scratch, self.run_rows, self.fan_in = scratch, run_rows, fan_in
        scratch.mkdir(parents=True, exist_ok=True)
        self.runs: list[Path] = []
        self.files = 0
        self.feature = np.empty(run_rows, np.int32)
        self.value = np.empty(run_rows, np.float32)
        self.token = np.empty(run_rows, np.int64)
        self.held = 0
        self.rows = 0

    def add(self, feature: np.ndarray, value: np.ndarray, token_index: np.ndarray) -> None:
        """Add rows; a full buffer is sorted and spilled as a run."""
        self.rows += len(feature)
        done = 0
        while done < len(feature):
            take = min(len(feature) - done, self.run_rows - self.held)
            span = slice(self.held, self.held + take)
            self.feature[span], self.value[span], self.token[span] = (a[done : done + take] for a in (feature, value, token_index))
            self.held += take
            done += take
            if self.held == self.run_rows:
                self._spill()

    def _new_run(self) -> tuple[Path, _GroupedWriter]:
        path = self.scratch / f"run-{self.files:06d}.parquet"
        self.files += 1
        return path, _GroupedWriter(path, RUN_GROUP, compression="lz4")

    def _spill(self) -> None:
        n = self.held
        order = np.lexsort((self.token[:n], _keys(self.feature[:n], self.value[:n])))
        path, out = self._new_run()
        for lo in range(0, n, RUN_GROUP):  # gathered a row group at a time: no sorted copy of the buffer
            rows = order[lo : lo + RUN_GROUP]
            out.write(self.feature[rows], self.value[rows], self.token[rows])
        out.close()
        self.runs.append(path)
        self.held = 0

    def finish(self, path: Path, row_group_size: int, compression: str = "zstd") -> int:
        """Write every row, sorted, to path in row groups of row_group_size; returns the row count.
        The runs are deleted as they are merged."""
        if self.held or not self.runs:
            self._spill()
        crash_point("rows-spilled")
        while len(self.runs) > self.fan_in:
            rounds, self.runs = self.runs, []
            for lo in range(0, len(rounds), self.fan_in):
                group = rounds[lo : lo + self.fan_in]
                run_path, out = self._new_run()
                self.runs.append(run_path)
                _merge(group, out)
                out.close()
                for run in group:
                    run.unlink()
        out = _GroupedWriter(path, row_group_size, compression)
        _merge(self.runs, out)
        for run in self.runs:
            run.unlink()
        self.runs = []
        return out.close()
