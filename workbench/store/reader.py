"""The notebook and app view of a store: SQL over DuckDB views, activations as torch tensors.

Every query opens a fresh in-memory DuckDB whose views point at the finished Parquet files,
so readers never take a lock and never see a half-written batch, while a capture keeps
writing. Dense activations are read straight from Parquet with pyarrow (no SQL round trip)
and streamed batch file by batch file, so data larger than memory can be walked.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from workbench.errors import WorkbenchError
from workbench.store.activation_files import ActivationFile, fill_rows, iter_rows, list_activation_files, pooled_empty
from workbench.store.layout import (
    ACT_PREFIX,
    TOKENS_TABLE,
    activation_view,
    committed_batches,
    holds_only_leftovers,
    read_manifest,
    tables_dir,
)
from workbench.store.table_group import derived_views, is_table_group
from workbench.store.writer import write_table


def parquet_source(files: list[str]) -> str:
    """SQL for reading exactly these Parquet files (paths quoted, never user text)."""
    quoted = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
    return f"read_parquet([{quoted}])"


def sql_identifier(name: str) -> str:
    """A name quoted as a DuckDB identifier (inner double quotes doubled), so a table name
    read from a store can never end the identifier and run SQL of its own."""
    return '"' + name.replace('"', '""') + '"'


#: Columns and DuckDB types of the tokens table (workbench.capture.batch_tables writes it).
EMPTY_TOKENS_COLUMNS = (
    ("token_index", "BIGINT"), ("seq", "BIGINT"), ("pos", "INTEGER"), ("doc", "BIGINT"), ("token_id", "INTEGER"), ("token", "VARCHAR"),
)

#: Names a reader accepts from the store's folders: derived table folders (what write_table
#: allows) and batch file stems (tokens, probe tables, act.<TransformerLens hook name>).
TABLE_NAME = re.compile(r"[A-Za-z0-9_]+")
BATCH_FILE_NAME = re.compile(r"[A-Za-z0-9_.]+")


def _valid_names(names: list[str], pattern: re.Pattern[str], where: Path) -> list[str]:
    """The names that match pattern; each other one is skipped with a warning."""
    kept = []
    for name in names:
        if pattern.fullmatch(name):
            kept.append(name)
        else:
            warnings.warn(f"store {where}: skipping {name!r} (not a workbench table name)", stacklevel=3)
    return kept


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
        if manifest is None and holds_only_leftovers(root):
            manifest = {}  # a capture is creating it: an empty store until its manifest lands
        elif manifest is None:
            manifest = read_manifest(root)  # a capture writes store.json first: it may have landed meanwhile
            if manifest is None:
                raise WorkbenchError(f"{root} is not a workbench store (no store.json)")
        return cls(root, manifest)

    # ---- what the store holds ----------------------------------------------------------
    @property
    def model_name(self) -> str:
        if "model" not in self.manifest:
            raise WorkbenchError(f"store {self.root} is still being created: its capture has not yet written store.json")
        return self.manifest["model"]["name"]

    @property
    def hooks(self) -> dict[str, dict[str, Any]]:
        return self.manifest.get("hooks", {})

    def _batches(self) -> list[Path]:
        return committed_batches(self.root)

    def _batch_tables(self, batches: list[Path] | None = None) -> list[str]:
        """Table names in the batch folders (tokens, act.<hook>, probe tables); all batches hold the same."""
        batches = self._batches() if batches is None else batches
        if not batches:
            return []
        return _valid_names(sorted(p.stem for p in batches[0].glob("*.parquet")), BATCH_FILE_NAME, batches[0])

    def _derived_tables(self) -> list[str]:
        folder = tables_dir(self.root)
        if not folder.is_dir():
            return []
        names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        return _valid_names(names, TABLE_NAME, folder)

    def n_tokens(self) -> int:
        """Tokens in finished batches (from Parquet footers; no data read)."""
        return sum(pq.ParquetFile(b / f"{TOKENS_TABLE}.parquet").metadata.num_rows for b in self._batches())

    def info(self) -> dict[str, Any]:
        capture = self.manifest.get("capture", {})
        views = self.views().keys()
        probe_tables = [t for t in self._batch_tables() if t != TOKENS_TABLE and not t.startswith(ACT_PREFIX)]
        return {
            "path": str(self.root),
            "model": self.manifest.get("model", {}),
            "hooks": self.hooks,
            "tokens": self.n_tokens(),
            "tokens_requested": capture.get("tokens"),
            "batches": len(self._batches()),
            "ctx": capture.get("ctx"),
            "data": capture.get("data"),
            "probes": capture.get("probes", []),
            "probe_tables": probe_tables,
            "tables": sorted(derived_views(self.root, self._derived_tables())),
            "views": sorted(views | (self._empty_views().keys() if TOKENS_TABLE not in views else set())),
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
            for table in self._batch_tables(batches):
                name = activation_view(table[len(ACT_PREFIX):]) if table.startswith(ACT_PREFIX) else table
                views[name] = [str(b / f"{table}.parquet") for b in batches]
        views.update(derived_views(self.root, self._derived_tables()))
        return views

    def connect(self) -> duckdb.DuckDBPyConnection:
        """A fresh in-memory DuckDB with one view per table (a snapshot); close it when done."""
        con = duckdb.connect(":memory:")
        views = self.views()
        for name, files in views.items():
            con.execute(f"CREATE VIEW {sql_identifier(name)} AS SELECT * FROM {parquet_source(files)}")
        if TOKENS_TABLE not in views:  # no batch yet: the capture's views exist, with no rows
            for name, columns in self._empty_views().items():
                con.execute(f"CREATE VIEW {sql_identifier(name)} AS SELECT {columns} WHERE false")
        return con

    def _empty_views(self) -> dict[str, str]:
        """View name -> typed columns of the capture tables before their first batch lands."""
        views = {TOKENS_TABLE: ", ".join(f"NULL::{kind} AS {column}" for column, kind in EMPTY_TOKENS_COLUMNS)}
        for hook, meta in self.hooks.items():
            width = math.prod(int(n) for n in meta["shape"])
            element = "FLOAT" if meta["dtype"] == "float32" else "SMALLINT"
            views[activation_view(hook)] = f"NULL::BIGINT AS token_index, NULL::{element}[{width}] AS act"
        return views

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

    def activation_files(self, hook: str) -> list[ActivationFile]:
        """The hook's file in every finished batch, with its token range (one listing)."""
        self._hook_meta(hook)
        return list_activation_files(self._batches(), hook)

    def _hook_width(self, hook: str) -> tuple[str, int]:
        meta = self._hook_meta(hook)
        return meta["dtype"], math.prod(meta["shape"])

    def iter_activations(
        self, hook: str, chunk_tokens: int = 65536, start: int | None = None, stop: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Iterator[torch.Tensor]:
        """Stream activations [<= chunk_tokens, d] in token order (float32 unless dtype says
        otherwise); memory stays one chunk. Each chunk is filled straight from the files."""
        if chunk_tokens <= 0:
            raise WorkbenchError("chunk_tokens must be positive")
        stored, d = self._hook_width(hook)
        files = self.activation_files(hook)
        total = files[-1].first + files[-1].rows if files else 0
        lo, hi = max(start or 0, 0), min(total if stop is None else stop, total)
        yield from iter_rows(files, stored, d, lo, hi, chunk_tokens, dtype)

    def activations(self, hook: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Float32 activations [n, d] for token_index in [start, stop), in token order."""
        stored, d = self._hook_width(hook)
        files = self.activation_files(hook)
        total = files[-1].first + files[-1].rows if files else 0
        lo, hi = max(start or 0, 0), min(total if stop is None else stop, total)
        out = pooled_empty(max(hi - lo, 0), d, torch.float32)
        fill_rows(files, stored, d, lo, hi, out)
        return out
