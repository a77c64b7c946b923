"""A capture SIGKILLed at each of its file-system steps resumes with the same command.

The process kills itself at a named step (WORKBENCH_CRASH_AT, workbench.store.crash), so
every instant between two steps is hit on purpose, not by a timer's luck: the store folder
made, the write probe on disk, the first manifest's temporary empty and then whole, a batch
folder begun and half filled, and the last manifest rewrite.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.cli_process import run_workbench
from workbench import Store

TOKENS = 300  # three batches of 2 x 64, the last one cut
ARGS = ("capture", "--model", "tiny-relu", "--data", "builtin", "--hooks", "blocks.0.hook_resid_post",
        "--tokens", str(TOKENS), "--ctx", "64", "--batch-size", "2")  # fmt: skip
STEPS = [
    "store-folder", "write-test", "manifest-temporary:1", "manifest-written:1",
    "batch-folder:1", "batch-file:1", "batch-file:2", "batch-folder:3", "manifest-temporary:2", "manifest-written:2",
]  # fmt: skip


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("clean") / "store"
    done = run_workbench(*ARGS, "--store", str(store))
    assert done.returncode == 0, done.stderr
    return store


def _leftovers(store: Path) -> list[str]:
    return [str(p.relative_to(store)) for p in store.rglob("*") if p.name.startswith((".tmp-", ".write-test-", ".old-"))]


@pytest.mark.parametrize("step", STEPS)
def test_killed_at_a_step_then_the_same_command_completes(step, clean, tmp_path):
    store = tmp_path / "store"
    killed = run_workbench(*ARGS, "--store", str(store), env={"WORKBENCH_CRASH_AT": step})
    assert killed.returncode == -signal.SIGKILL, (step, killed.returncode, killed.stderr[-500:])
    reader = Store.open(store)  # mid-creation or not, a reader sees a store and no exception
    assert reader.n_tokens() < TOKENS or step.startswith("manifest-")
    rerun = run_workbench(*ARGS, "--store", str(store))
    assert rerun.returncode == 0, (step, rerun.stderr)
    resumed = Store.open(store)
    assert resumed.sql("SELECT count(*), count(DISTINCT token_index), max(token_index) FROM tokens").fetchall() == [(TOKENS, TOKENS, TOKENS - 1)]
    assert resumed.manifest["capture"]["complete"]
    query = "SELECT token_index, token_id FROM tokens ORDER BY token_index"
    assert resumed.df(query).equals(Store.open(clean).df(query))
    assert _leftovers(store) == []
