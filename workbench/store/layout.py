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
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError

MANIFEST = "store.json"
FORMAT_VERSION = 1
BATCH_GLOB = "batch-*"
TOKENS_TABLE = "tokens"
ACT_PREFIX = "act."


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
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    write_atomic(root / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
