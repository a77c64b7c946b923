"""The notebook and app view of a store: SQL over DuckDB views, activations as torch tensors.

Every query opens a fresh in-memory DuckDB whose views point at the finished Parquet files,
so readers never take a lock and never see a half-written batch, while a capture keeps
writing. Dense activations are read straight from Parquet with pyarrow (no SQL round trip)
and streamed batch file by batch file, so data larger than memory can be walked.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from workbench.errors import WorkbenchError
from workbench.store.encoding import decode_activations
from workbench.store.layout import (
    ACT_PREFIX,
    TOKENS_TABLE,
    activation_file,
    activation_view,
    committed_batches,
    read_manifest,
    tables_dir,
)
from workbench.store.table_group import derived_views, is_table_group
from workbench.store.writer import write_table


def parquet_source(files: list[str]) -> str:
    """SQL for reading exactly these Parquet files (paths quoted, never user text)."""
    quoted = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
    return f"read_parquet([{quoted}])"


class Store:
    """A capture store folder. Open with Store.open(path)."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | Path) -> Store:
        root = Path(path).expanduser()
        if not root.is_dir():
            raise WorkbenchError(f"no store at {root}: run `workbench capture --store {root} ...` first")
        manifest = read_manifest(root)
        if manifest is None:
            raise WorkbenchError(f"{root} is not a workbench store (no store.json)")
        return cls(root, manifest)

    # ---- what the store holds ----------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.manifest["model"]["name"]

    @property
    def hooks(self) -> dict[str, dict[str, Any]]:
        return self.manifest.get("hooks", {})

    def _batches(self) -> list[Path]:
        return committed_batches(self.root)

    def _batch_tables(self) -> list[str]:
        """Table names in the batch folders (tokens, act.<hook>, probe tables); all batches hold the same."""
        batches = self._batches()
        return sorted(p.stem for p in batches[0].glob("*.parquet")) if batches else []

    def _derived_tables(self) -> list[str]:
        folder = tables_dir(self.root)
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))

    def n_tokens(self) -> int:
        """Tokens in finished batches (from Parquet footers; no data read)."""
        return sum(pq.ParquetFile(b / f"{TOKENS_TABLE}.parquet").metadata.num_rows for b in self._batches())

    def info(self) -> dict[str, Any]:
        capture = self.manifest.get("capture", {})
        probe_tables = [t for t in self._batch_tables() if t != TOKENS_TABLE and not t.startswith(ACT_PREFIX)]
        return {
            "path": str(self.root),
            "model": self.manifest["model"],
            "hooks": self.hooks,
            "tokens": self.n_tokens(),
            "tokens_requested": capture.get("tokens"),
            "batches": len(self._batches()),
            "ctx": capture.get("ctx"),
            "data": capture.get("data"),
            "probes": capture.get("probes", []),
            "probe_tables": probe_tables,
            "tables": sorted(derived_views(self.root, self._derived_tables())),
            "views": sorted(self.views()),
        }

    # ---- SQL ---------------------------------------------------------------------------
    def views(self) -> dict[str, list[str]]:
        """View name -> the Parquet files behind it, all from one listing of the store.

        Every table of the capture is listed from the same set of finished batches, so a
        connection built from this is a consistent snapshot: tokens and activations always
        count the same rows, even while a capture keeps adding batches.
        """
        views: dict[str, list[str]] = {}
        batches = self._batches()
        if batches:
            for table in sorted(p.stem for p in batches[0].glob("*.parquet")):
                name = activation_view(table[len(ACT_PREFIX):]) if table.startswith(ACT_PREFIX) else table
                views[name] = [str(b / f"{table}.parquet") for b in batches]
        views.update(derived_views(self.root, self._derived_tables()))
        return views

    def connect(self) -> duckdb.DuckDBPyConnection:
        """A fresh in-memory DuckDB with one view per table (a snapshot); close it when done."""
        con = duckdb.connect(":memory:")
        for name, files in self.views().items():
            con.execute(f'CREATE VIEW "{name}" AS SELECT * FROM {parquet_source(files)}')
        return con

    def sql(self, query: str, params: list[Any] | dict[str, Any] | None = None) -> duckdb.DuckDBPyRelation:
        """Run SQL over the store's views; the relation prints as a table in notebooks."""
        con = self.connect()
        try:
            return con.sql(query, params=params) if params is not None else con.sql(query)
        except duckdb.Error as err:
            raise WorkbenchError(f"SQL failed on store {self.root}: {err}".splitlines()[0]) from err

    def df(self, query: str, params: list[Any] | dict[str, Any] | None = None) -> pd.DataFrame:
        """Run SQL and return a pandas frame (parameters bind, never string formatting)."""
        con = self.connect()
        try:
            return con.execute(query, params or []).df()
        except duckdb.Error as err:
            raise WorkbenchError(f"SQL failed on store {self.root}: {str(err).splitlines()[0]}") from err
        finally:
            con.close()

    def tokens(self, start: int | None = None, stop: int | None = None) -> pd.DataFrame:
        """Token rows (token_index, seq, pos, doc, token_id, token) in token order."""
        if not self._batches():
            return pd.DataFrame(columns=["token_index", "seq", "pos", "doc", "token_id", "token"])
        lo = 0 if start is None else start
        hi = 2**62 if stop is None else stop
        return self.df(
            "SELECT * FROM tokens WHERE token_index >= ? AND token_index < ? ORDER BY token_index", [lo, hi]
        )

    def write_table(self, name: str, table: pa.Table | pd.DataFrame, row_group_size: int | None = None) -> None:
        """Store or replace a derived table, visible to sql() as a view of that name."""
        if is_table_group(tables_dir(self.root) / name):
            raise WorkbenchError(f"'{name}' is a table group of store {self.root} (tables published together); pick another name")
        if isinstance(table, pd.DataFrame):
            table = pa.Table.from_pandas(table, preserve_index=False)
        write_table(self.root, name, table, row_group_size)

    # ---- dense activations -------------------------------------------------------------
    def _hook_meta(self, hook: str) -> dict[str, Any]:
        if hook not in self.hooks:
            stored = ", ".join(self.hooks) or "none"
            raise WorkbenchError(f"hook '{hook}' is not in store {self.root} (stored hooks: {stored})")
        return self.hooks[hook]

    def _batch_ranges(self) -> list[tuple[Path, int, int]]:
        """(batch folder, first token_index, row count) for every finished batch."""
        ranges = []
        start = 0
        for batch in self._batches():
            rows = pq.ParquetFile(batch / f"{TOKENS_TABLE}.parquet").metadata.num_rows
            ranges.append((batch, start, rows))
            start += rows
        return ranges

    def _iter_batch_activations(self, hook: str, lo: int, hi: int) -> Iterator[torch.Tensor]:
        """Float32 [n, d] per batch file, clipped to token_index in [lo, hi)."""
        meta = self._hook_meta(hook)
        d = int(torch.tensor(meta["shape"]).prod())
        for folder, first, rows in self._batch_ranges():
            if first + rows <= lo or first >= hi:
                continue
            table = pq.read_table(folder / f"{activation_file(hook)}.parquet", columns=["act"])
            acts = decode_activations(table.column("act"), meta["dtype"], d)
            yield acts[max(lo - first, 0) : min(hi - first, rows)]

    def iter_activations(
        self, hook: str, chunk_tokens: int = 65536, start: int | None = None, stop: int | None = None
    ) -> Iterator[torch.Tensor]:
        """Stream float32 activations [<= chunk_tokens, d] in token order; memory stays one chunk."""
        if chunk_tokens <= 0:
            raise WorkbenchError("chunk_tokens must be positive")
        lo = 0 if start is None else start
        hi = 2**62 if stop is None else stop
        pending: list[torch.Tensor] = []
        held = 0
        for part in self._iter_batch_activations(hook, lo, hi):
            pending.append(part)
            held += len(part)
            while held >= chunk_tokens:
                joined = torch.cat(pending)
                yield joined[:chunk_tokens]
                pending, held = [joined[chunk_tokens:]], held - chunk_tokens
        if held:
            yield torch.cat(pending)

    def activations(self, hook: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Float32 activations [n, d] for token_index in [start, stop), in token order."""
        lo = 0 if start is None else start
        hi = 2**62 if stop is None else stop
        parts = list(self._iter_batch_activations(hook, lo, hi))
        if not parts:
            d = int(torch.tensor(self._hook_meta(hook)["shape"]).prod())
            return torch.empty(0, d)
        return torch.cat(parts)
