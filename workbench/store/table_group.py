"""Derived tables that publish together: a table group, written one unit at a time.

A feature pass writes tables that only make sense together (an SAE's feature rows, stats,
co-firing partners, and its row of the `saes` table every SAE of the store shares); an
analysis writes several. Published one after another, a killed rerun could leave new rows
beside old stats. A group instead lives in one folder whose small manifest, `current`, names
every member table's files:

    tables/<group>/current                 {"tables": {"<member>": ["<unit>/<member>.parquet"], ...}}
    tables/<group>/<unit>/<member>.parquet the files one unit published
    tables/<group>/.tmp-<unit>/            a unit being written (readers never look here)
    tables/<group>/.tmp-<unit>.lock        held (flock) while that unit's writer lives
    tables/<group>/.lock                   held while a unit publishes

A unit writes its tables into its staging folder, renames the folder into the group, then
replaces `current` atomically: a reader lists the old manifest or the new one, so it sees
the old set of tables or the new set, never a mix. Members a unit does not write are carried
over from the previous manifest (another SAE's tables stay). After the switch, files that no
manifest names any more, staging folders whose writer died (their lock is free), and plain
table folders of an older layout that a member now replaces are deleted. Publication holds
the group's lock, so two writers never interleave a manifest update and that cleanup.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Self, TypeVar

import pandas as pd
import pyarrow as pa

from workbench.errors import WorkbenchError
from workbench.store.crash import crash_point
from workbench.store.layout import tables_dir, write_atomic
from workbench.store.writer import _write_parquet, fsync_file

GROUP_MANIFEST = "current"
STAGING_PREFIX = ".tmp-"
GROUP_LOCK = ".lock"
TABLE_NAME = re.compile(r"[0-9A-Za-z_]+")
#: A manifest entry: a unit folder (16 hex digits) and a member's file; nothing else is read.
MEMBER_FILE = re.compile(r"[0-9a-f]{16}/[0-9A-Za-z_]+\.parquet")

T = TypeVar("T")


def is_table_group(folder: Path) -> bool:
    """Whether a folder under tables/ is a table group (it holds a manifest)."""
    return (folder / GROUP_MANIFEST).is_file()


def group_members(folder: Path) -> dict[str, list[str]]:
    """A group's published members: table name -> files relative to the group folder.
    Entries that are not a workbench table and a unit's file are skipped with a warning."""
    try:
        tables = json.loads((folder / GROUP_MANIFEST).read_text())["tables"]
        if not isinstance(tables, dict):
            raise TypeError("tables is not an object")
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as err:
        warnings.warn(f"table group {folder}: skipping it, its manifest is unreadable ({err})", stacklevel=2)
        return {}
    members = {}
    for name, files in tables.items():
        if TABLE_NAME.fullmatch(name) and isinstance(files, list) and all(isinstance(f, str) and MEMBER_FILE.fullmatch(f) for f in files):
            members[name] = files
        else:
            warnings.warn(f"table group {folder}: skipping member {name!r} (not a workbench table)", stacklevel=2)
    return members


def derived_views(root: Path, folders: list[str]) -> dict[str, list[str]]:
    """Derived table name -> its Parquet files, for the given folders under the store's tables/:
    a plain folder is one table, a group contributes its members. A member wins over a plain
    folder of the same name (an older layout's table, deleted once the group replaces it)."""
    plain: dict[str, list[str]] = {}
    members: dict[str, list[str]] = {}
    for name in folders:
        folder = tables_dir(root) / name
        if is_table_group(folder):
            members.update({table: [str(folder / f) for f in files] for table, files in group_members(folder).items()})
        elif files := sorted(folder.glob("*.parquet")):  # a group's folder before its first manifest holds none
            plain[name] = [str(p) for p in files]
    return dict(sorted({**plain, **members}.items()))


def _lock(path: Path, wait: bool = True) -> IO[str] | None:
    """An open file holding an exclusive flock on path, or None when wait=False and it is held."""
    handle = open(path, "a")  # noqa: SIM115 - held open for the lock's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def _remove_abandoned(folder: Path) -> None:
    """Delete staging folders (and their lock files) whose writer is gone."""
    for lock in folder.glob(f"{STAGING_PREFIX}*.lock"):
        held = _lock(lock, wait=False)
        if held is not None:  # no live writer holds it
            shutil.rmtree(lock.with_suffix(""), ignore_errors=True)
            lock.unlink(missing_ok=True)
            held.close()
    for staging in folder.glob(f"{STAGING_PREFIX}*"):
        if staging.is_dir() and not staging.with_name(staging.name + ".lock").exists():  # the lock comes first
            shutil.rmtree(staging, ignore_errors=True)


class TableUnit:
    """Tables written together into a group and published as one unit on leaving the
    `with` block (discarded instead when the block raises)."""

    def __init__(self, root: Path, group: str) -> None:
        if not TABLE_NAME.fullmatch(group):
            raise WorkbenchError(f"table group name '{group}' must be letters, digits and underscores")
        self.root = root
        self.folder = tables_dir(root) / group
        if not is_table_group(self.folder) and any(self.folder.glob("*.parquet")):
            raise WorkbenchError(f"{self.folder} holds a table, not a table group; rename or remove it")
        self.unit = uuid.uuid4().hex[:16]
        self.staging = self.folder / f"{STAGING_PREFIX}{self.unit}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            _remove_abandoned(self.folder)
            self._alive = _lock(self.folder / f"{STAGING_PREFIX}{self.unit}.lock")
            self.staging.mkdir()
        except OSError as err:
            raise WorkbenchError(f"cannot write tables into {self.folder}: {err}") from err
        self.members: dict[str, list[str]] = {}

    @property
    def scratch(self) -> Path:
        """A folder for the unit's temporary files (deleted before publishing)."""
        return self.staging / ".scratch"

    def write_file(self, name: str, write: Callable[[Path], T]) -> T:
        """Make `name` a member written by write(path); returns what write returns."""
        if not TABLE_NAME.fullmatch(name):
            raise WorkbenchError(f"table name '{name}' must be letters, digits and underscores")
        result = write(self.staging / f"{name}.parquet")
        self.members[name] = [f"{self.unit}/{name}.parquet"]
        crash_point(f"group-member-{name}")
        return result

    def write_table(self, name: str, table: pa.Table | pd.DataFrame, row_group_size: int | None = None) -> None:
        """Make `name` a member holding this table."""
        if isinstance(table, pd.DataFrame):
            table = pa.Table.from_pandas(table, preserve_index=False)
        self.write_file(name, lambda path: _write_parquet(table, path, dense=False, row_group_size=row_group_size))

    def publish(self) -> None:
        """Switch the group's manifest to the previous members with this unit's replacing theirs."""
        shutil.rmtree(self.scratch, ignore_errors=True)
        for name in self.members:
            fsync_file(self.staging / f"{name}.parquet")
        held = _lock(self.folder / GROUP_LOCK)
        try:
            os.rename(self.staging, self.folder / self.unit)
            crash_point("group-renamed")
            members = {**group_members(self.folder), **self.members}
            write_atomic(self.folder / GROUP_MANIFEST, json.dumps({"tables": members}, indent=2, sort_keys=True))
            crash_point("group-published")
            self._clean(members)
        finally:
            held.close()
            self._release()

    def discard(self) -> None:
        """Delete everything this unit wrote; the group stays as it was."""
        shutil.rmtree(self.staging, ignore_errors=True)
        self._release()

    def _release(self) -> None:
        (self.folder / f"{STAGING_PREFIX}{self.unit}.lock").unlink(missing_ok=True)
        self._alive.close()

    def _clean(self, members: dict[str, list[str]]) -> None:
        keep = {f for files in members.values() for f in files}
        for unit in self.folder.iterdir():
            if unit.name.startswith(".") or not unit.is_dir():
                continue
            for path in unit.iterdir():
                if f"{unit.name}/{path.name}" not in keep:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
            if not any(unit.iterdir()):
                unit.rmdir()
        _remove_abandoned(self.folder)
        for name in members:
            plain = tables_dir(self.root) / name
            if plain != self.folder and not is_table_group(plain) and any(plain.glob("*.parquet")):
                shutil.rmtree(plain, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        if kind is None:
            self.publish()
        else:
            self.discard()
