"""Where things live inside a store folder, and the manifest that says what the store holds.

A store is a folder, not one DuckDB file: DuckDB's file lock would stop the app or a notebook
from reading while a capture writes. Instead every capture batch is a folder of immutable
Parquet files, written under a temporary name and renamed into place (atomic on POSIX), and
readers open an in-memory DuckDB with views over the finished files:

    store/
      store.json                       manifest: model, hooks, capture settings
      capture/batch-000000/            one folder per whole batch
          tokens.parquet
          act.blocks.1.hook_resid_post.parquet
          <probe table>.parquet
      capture/.tmp-...                 a batch being written (ignored by readers)
      tables/<name>/part-*.parquet     a derived table written on its own
      tables/<group>/current           a table group: derived tables published together
      tables/<group>/<unit>/<name>.parquet   (an SAE's feature tables, an analysis's tables;
                                       see table_group.py)
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import uuid
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.store.crash import crash_point

MANIFEST = "store.json"
FORMAT_VERSION = 1
BATCH_GLOB = "batch-*"
TOKENS_TABLE = "tokens"
ACT_PREFIX = "act."
#: Names of what a writer leaves while it works: a temporary file or folder being filled
#: (renamed into place when whole) and capture's probe that the folder is writable.
TMP_PREFIX = ".tmp-"
WRITE_TEST_PREFIX = ".write-test-"


def batch_dir_name(batch: int) -> str:
    return f"batch-{batch:06d}"


def activation_file(hook: str) -> str:
    """File name (without .parquet) of a hook's dense activations inside a batch folder."""
    return f"{ACT_PREFIX}{hook}"


def activation_view(hook: str) -> str:
    """SQL view name of a hook's activations: act_blocks_1_hook_resid_post."""
    return "act_" + re.sub(r"[^0-9A-Za-z]+", "_", hook).strip("_")


def capture_dir(root: Path) -> Path:
    return root / "capture"


def tables_dir(root: Path) -> Path:
    return root / "tables"


def committed_batches(root: Path) -> list[Path]:
    """Finished batch folders in batch order (temporary folders are never matched)."""
    return sorted(capture_dir(root).glob(BATCH_GLOB))


def temporary_name(label: str, prefix: str = TMP_PREFIX) -> str:
    """A unique name for something being written, carrying the writer's process id so a later
    writer can tell a killed run's leftover (removed) from a live run's work (kept)."""
    return f"{prefix}{os.getpid()}-{label}-{uuid.uuid4().hex[:8]}"


def writer_alive(name: str, prefix: str) -> bool:
    """Whether the process that named this temporary (temporary_name) is still running here."""
    pid = name[len(prefix):].split("-")[0]
    if not pid.isdigit():
        return False  # not named by a live writer of this layout
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def holds_only_leftovers(root: Path) -> bool:
    """True for a folder a capture may take as a fresh store: empty, or holding only what a
    capture killed before its first manifest landed leaves (write probes, temporaries, an
    empty capture/ or one with temporary batches only)."""
    for entry in root.iterdir():
        if entry.name.startswith((TMP_PREFIX, WRITE_TEST_PREFIX)):
            continue
        if entry == capture_dir(root) and entry.is_dir() and all(p.name.startswith(TMP_PREFIX) for p in entry.iterdir()):
            continue
        return False
    return True


def read_manifest(root: Path) -> dict[str, Any] | None:
    path = root / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise WorkbenchError(f"store manifest {path} is unreadable ({err}); is this a workbench store?") from err


def write_atomic(path: Path, text: str) -> None:
    """Write a small file so readers see the old or the new content, never a torn one."""
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=path.parent)
    crash_point("manifest-temporary")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    crash_point("manifest-written")
    os.replace(tmp, path)


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    write_atomic(root / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
