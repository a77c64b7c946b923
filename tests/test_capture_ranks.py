"""`workbench capture` under torchrun: two real processes fill disjoint batches of one store,
which equals the one-process capture; a SIGKILL of one rank leaves whole batches, and the
rerun command resumes them into the same store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from tests.cli_process import REPO, run_workbench
from workbench import Store
from workbench.store.layout import committed_batches, read_manifest

CTX, BATCH, TOKENS = 64, 2, 6_000  # 128 tokens a batch, 47 batches: slow enough to interrupt
ARGS = ("capture", "--model", "tiny-relu", "--data", "builtin", "--hooks", "blocks.1.hook_resid_post",
        "--tokens", str(TOKENS), "--ctx", str(CTX), "--batch-size", str(BATCH))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def torchrun_argv(store: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "workbench.cli", *ARGS, "--store", str(store)]


def same_as_one_process(store: Path, clean: Path) -> None:
    """store holds exactly what the one-process capture in clean holds."""
    ours, theirs = Store.open(store), Store.open(clean)
    for view in ("tokens", "act_blocks_1_hook_resid_post"):
        n, distinct, lo, hi = ours.sql(f"SELECT count(*), count(DISTINCT token_index), min(token_index), max(token_index) FROM {view}").fetchall()[0]
        assert (n, distinct, lo, hi) == (TOKENS, TOKENS, 0, TOKENS - 1), view
    a, b = ours.activations("blocks.1.hook_resid_post"), theirs.activations("blocks.1.hook_resid_post")
    assert a.shape == b.shape and (a - b).abs().max().item() < 1e-5
    query = "SELECT token_index, token_id, doc FROM tokens ORDER BY token_index"
    assert ours.df(query).equals(theirs.df(query))
    assert read_manifest(store)["capture"]["complete"]
    assert not list((store / "capture").glob(".tmp-*"))


def rank_pid(launcher: subprocess.Popen, rank: int, timeout: float = 60) -> int:
    """The process id of torchrun's worker of this rank (its child with RANK=rank)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for children in Path(f"/proc/{launcher.pid}/task").glob("*/children"):
            for pid in children.read_text().split():
                try:
                    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if f"RANK={rank}".encode() in environ:
                    return int(pid)
        time.sleep(0.05)
    raise AssertionError(f"no rank {rank} under torchrun after {timeout}s")


def test_two_ranks_fill_one_store_like_one_process(tmp_path):
    store, clean = tmp_path / "store", tmp_path / "clean"
    done = subprocess.run(torchrun_argv(store), capture_output=True, text=True, timeout=300, cwd=REPO, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("stored 6000 tokens") == 1, done.stdout  # rank 0 reports for both
    assert len(committed_batches(store)) == 47
    single = run_workbench(*ARGS, "--store", str(clean))
    assert single.returncode == 0, single.stderr
    same_as_one_process(store, clean)


def test_a_killed_rank_leaves_whole_batches_and_the_rerun_resumes(tmp_path):
    store, clean = tmp_path / "store", tmp_path / "clean"
    with open(tmp_path / "first.log", "wb") as log:
        launcher = subprocess.Popen(torchrun_argv(store), stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=ENV)
    victim = rank_pid(launcher, 1)
    deadline = time.time() + 120
    def both_ranks_committed(batches: list) -> bool:  # rank r writes the batches n with n % 2 == r
        return len({int(p.name.removeprefix("batch-")) % 2 for p in batches}) == 2

    # a loaded machine can run one rank several batches ahead: wait for both, not just a count
    while len(committed_batches(store)) < 6 or not both_ranks_committed(committed_batches(store)):
        assert launcher.poll() is None and time.time() < deadline, "the capture ended before it could be interrupted"
        time.sleep(0.05)
    os.kill(victim, signal.SIGKILL)
    assert launcher.wait(timeout=120) != 0  # torchrun stops rank 0 and fails

    batches = committed_batches(store)
    assert 6 <= len(batches) < 47
    assert both_ranks_committed(batches)
    for folder in batches:  # whole batches: the last of the run holds the remainder
        n = int(folder.name.removeprefix("batch-"))
        whole = min(CTX * BATCH, TOKENS - n * CTX * BATCH)
        assert {pq.ParquetFile(f).metadata.num_rows for f in folder.iterdir()} == {whole}
    assert not read_manifest(store)["capture"]["complete"]

    rerun = subprocess.run(torchrun_argv(store), capture_output=True, text=True, timeout=300, cwd=REPO, env=ENV)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed after {len(batches)} stored batches" in rerun.stdout
    single = run_workbench(*ARGS, "--store", str(clean))
    assert single.returncode == 0, single.stderr
    same_as_one_process(store, clean)
