"""Writing into a store: whole batches at once, on a background thread.

Each batch's tables go into a temporary folder that is renamed into place only when every
file is on disk, so a SIGKILL at any moment leaves whole batches and nothing else. Parquet
encoding runs on a thread (pyarrow releases the GIL) while the model computes the next
batch, which is what keeps the store from being the bottleneck.
"""

from __future__ import annotations

import os
import queue
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from workbench.errors import WorkbenchError
from workbench.store.crash import crash_point
from workbench.store.layout import (
    ACT_PREFIX,
    TMP_PREFIX,
    WRITE_TEST_PREFIX,
    batch_dir_name,
    capture_dir,
    tables_dir,
    temporary_name,
    writer_alive,
)

#: A replaced table's old folder, renamed aside until the new one is in place.
RETIRED_PREFIX = ".old-"


def _write_parquet(table: pa.Table, path: Path, dense: bool, row_group_size: int | None = None) -> None:
    if dense:
        # Activation bits barely compress and never repeat: no compression, no dictionary and
        # no min/max statistics for the vectors (nothing filters on them); token_index keeps
        # its statistics, so SQL over a token range skips the files outside it.
        pq.write_table(table, path, compression="none", use_dictionary=False, write_statistics=["token_index"])
    else:
        pq.write_table(table, path, compression="zstd", row_group_size=row_group_size)
    fsync_file(path)


def fsync_file(path: Path) -> None:
    """Flush a written file to disk, so a rename that publishes it never exposes a torn file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_batch(root: Path, batch: int, tables: dict[str, pa.Table]) -> Path:
    """Write one batch's tables and publish them with a single rename."""
    final = capture_dir(root) / batch_dir_name(batch)
    tmp = capture_dir(root) / temporary_name(batch_dir_name(batch))
    tmp.mkdir(parents=True)
    crash_point("batch-folder")
    for name, table in tables.items():
        _write_parquet(table, tmp / f"{name}.parquet", dense=name.startswith(ACT_PREFIX))
        crash_point("batch-file")
    try:
        os.rename(tmp, final)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise WorkbenchError(f"batch {batch} already exists in {root}: is another capture writing to this store?") from err
    return final


def remove_leftovers(folder: Path, prefixes: tuple[str, ...] = (TMP_PREFIX,)) -> int:
    """Delete what killed writers left in folder (names starting with one of prefixes whose
    writing process is gone); a live writer's temporaries are kept. Returns how many."""
    if not folder.is_dir():
        return 0
    removed = 0
    for path in folder.iterdir():
        prefix = next((p for p in prefixes if path.name.startswith(p)), None)
        if prefix is None or writer_alive(path.name, prefix):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed += 1
    return removed


def restore_retired_tables(folder: Path) -> int:
    """Put back a table whose writer was killed between renaming the old folder aside and
    renaming the new one in: the retired folder (RETIRED_PREFIX + temporary_name's parts)
    becomes the table again, so a killed replacement never loses the table. Returns how many."""
    if not folder.is_dir():
        return 0
    restored = 0
    for path in folder.iterdir():
        if not path.name.startswith(RETIRED_PREFIX) or writer_alive(path.name, RETIRED_PREFIX):
            continue
        parts = path.name[len(RETIRED_PREFIX):].split("-")
        if len(parts) == 3 and parts[1].replace("_", "").isalnum() and not (folder / parts[1]).exists():
            os.rename(path, folder / parts[1])
            restored += 1
    return restored


def remove_partial_batches(root: Path) -> int:
    """Delete what a killed capture left behind (temporary batches, a half-written manifest,
    its write probe); returns how many."""
    return remove_leftovers(capture_dir(root)) + remove_leftovers(root, (TMP_PREFIX, WRITE_TEST_PREFIX))


def write_table(root: Path, name: str, table: pa.Table, row_group_size: int | None = None) -> Path:
    """Store (or replace) a derived table, e.g. an analysis result or SAE features.

    row_group_size: rows per Parquet row group; small groups on a sorted column let a
    filtered query read only the groups whose min/max stats match (SAE feature tables)."""
    if not name.replace("_", "").isalnum():
        raise WorkbenchError(f"table name '{name}' must be letters, digits and underscores")
    target = tables_dir(root) / name
    restore_retired_tables(tables_dir(root))
    remove_leftovers(tables_dir(root), (TMP_PREFIX, RETIRED_PREFIX))
    staging = tables_dir(root) / temporary_name(name)
    staging.mkdir(parents=True)
    _write_parquet(table, staging / "part-0.parquet", dense=False, row_group_size=row_group_size)
    retired = None
    if target.exists():
        retired = tables_dir(root) / temporary_name(name, RETIRED_PREFIX)
        os.rename(target, retired)
    os.rename(staging, target)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)
    return target


class BatchWriter:
    """Commits batches on background threads; errors surface on the next submit or close.

    With several threads, batches can land out of order; a killed capture may then leave a
    gap, which the resumed capture fills (every batch is identified by its number).
    """

    def __init__(self, root: Path, threads: int = 1) -> None:
        self.root = root
        self._queue: queue.Queue[tuple[int, Callable[[], dict[str, pa.Table]]] | None] = queue.Queue(maxsize=2 * threads)
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self.bytes_written = 0
        self._threads = [threading.Thread(target=self._drain, name=f"store-writer-{i}", daemon=True) for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue
            batch, make_tables = item
            try:
                folder = commit_batch(self.root, batch, make_tables())
                size = sum(f.stat().st_size for f in folder.iterdir())
                with self._lock:
                    self.bytes_written += size
            except BaseException as err:  # handed to the main thread
                self._error = err

    def _raise_pending(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, WorkbenchError):
                raise err
            raise WorkbenchError(f"writing to store {self.root} failed: {err}") from err

    def submit(self, batch: int, make_tables: Callable[[], dict[str, pa.Table]]) -> None:
        """Queue a batch; its tables are built on a writer thread (encoding runs off the main thread)."""
        self._raise_pending()
        self._queue.put((batch, make_tables))

    def close(self) -> None:
        """Wait until every submitted batch is on disk."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()
        self._raise_pending()
