"""Reliability with real processes: SIGKILL mid-capture, resume, and a reader beside a writer."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq

from tests.cli_process import REPO, run_workbench, start_workbench
from workbench import Store
from workbench.store.layout import committed_batches

CTX, BATCH, TOKENS = 64, 2, 6_000  # 128 tokens a batch, 47 batches: slow enough to interrupt
CAPTURE_ARGS = (
    "capture", "--model", "tiny-relu", "--data", "builtin", "--hooks", "blocks.1.hook_resid_post,blocks.0.mlp.hook_post",
    "--tokens", str(TOKENS), "--ctx", str(CTX), "--batch-size", str(BATCH),
)


def _wait_for_batches(store: Path, at_least: int, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(committed_batches(store)) >= at_least:
            return
        assert proc.poll() is None, "capture ended before it could be interrupted"
        time.sleep(0.05)
    raise AssertionError(f"no {at_least} batches after {timeout}s")


def test_sigkill_leaves_whole_batches_and_rerun_resumes_exactly(tmp_path):
    store = tmp_path / "store"
    proc = start_workbench(*CAPTURE_ARGS, "--store", str(store), log=tmp_path / "first.log")
    _wait_for_batches(store, 4, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    # the killed store opens and holds whole batches only
    batches = committed_batches(store)
    assert 4 <= len(batches) < TOKENS // (CTX * BATCH)
    for folder in batches:
        names = sorted(p.name for p in folder.iterdir())
        assert names == ["act.blocks.0.mlp.hook_post.parquet", "act.blocks.1.hook_resid_post.parquet", "tokens.parquet"]
        assert {pq.ParquetFile(folder / n).metadata.num_rows for n in names} == {CTX * BATCH}
    killed = Store.open(store)
    assert killed.n_tokens() == len(batches) * CTX * BATCH

    # the same command resumes and ends with exactly the tokens asked for
    rerun = run_workbench(*CAPTURE_ARGS, "--store", str(store))
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed after" in rerun.stdout
    resumed = Store.open(store)
    for view in ("tokens", "act_blocks_1_hook_resid_post", "act_blocks_0_mlp_hook_post"):
        n, distinct, lo, hi = resumed.sql(f"SELECT count(*), count(DISTINCT token_index), min(token_index), max(token_index) FROM {view}").fetchall()[
            0
        ]
        assert (n, distinct, lo, hi) == (TOKENS, TOKENS, 0, TOKENS - 1), view
    assert not list((store / "capture").glob(".tmp-*"))

    # and what it stored equals an uninterrupted capture of the same data
    clean = tmp_path / "clean"
    full = run_workbench(*CAPTURE_ARGS, "--store", str(clean))
    assert full.returncode == 0, full.stderr
    a = resumed.activations("blocks.1.hook_resid_post")
    b = Store.open(clean).activations("blocks.1.hook_resid_post")
    assert a.shape == b.shape and (a - b).abs().max().item() < 1e-5
    assert resumed.df("SELECT token_id FROM tokens ORDER BY token_index").equals(
        Store.open(clean).df("SELECT token_id FROM tokens ORDER BY token_index")
    )


READER = textwrap.dedent(
    """
    import sys, time
    from workbench import Store
    TOKENS = int(sys.argv[2])
    seen = []
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            store = Store.open(sys.argv[1])
        except Exception:
            time.sleep(0.05)
            continue
        if not store.info()["batches"]:
            time.sleep(0.05)
            continue
        con = store.connect()  # one snapshot: every table sees the same batches
        n = con.sql("SELECT count(*) FROM tokens").fetchall()[0][0]
        m = con.sql("SELECT count(*) FROM act_blocks_1_hook_resid_post").fetchall()[0][0]
        con.close()
        assert n == m, (n, m)
        assert n % 128 == 0 or n == TOKENS, n
        seen.append(n)
        if n == TOKENS:
            break
        time.sleep(0.02)
    print(len(seen), len(set(seen)), seen[-1])
    assert seen == sorted(seen)
    """
)


def test_a_reader_process_queries_while_a_capture_writes(tmp_path):
    store = tmp_path / "store"
    writer = start_workbench(*CAPTURE_ARGS, "--store", str(store), log=tmp_path / "writer.log")
    reader = subprocess.run([sys.executable, "-c", READER, str(store), str(TOKENS)], capture_output=True, text=True, timeout=180, cwd=REPO)
    writer.wait(timeout=180)
    assert writer.returncode == 0, (tmp_path / "writer.log").read_text()[-2000:]
    assert reader.returncode == 0, reader.stderr[-2000:]
    polls, distinct_counts, last = (int(x) for x in reader.stdout.split())
    assert last == TOKENS
    assert distinct_counts >= 3, "the reader should have seen the store grow while it was written"


def test_two_captures_into_one_store_never_mix_and_the_loser_says_why(tmp_path):
    """A second capture started beside a running one keeps its hands off the first one's
    temporary batches; whichever loses a batch to the other stops with one line."""
    store = tmp_path / "store"
    first = start_workbench(*CAPTURE_ARGS, "--store", str(store), log=tmp_path / "first.log")
    _wait_for_batches(store, 2, first)
    second = start_workbench(*CAPTURE_ARGS, "--store", str(store), log=tmp_path / "second.log")
    codes = [first.wait(timeout=180), second.wait(timeout=180)]
    logs = [(tmp_path / name).read_text() for name in ("first.log", "second.log")]
    for code, log in zip(codes, logs):
        assert code in (0, 2), log[-2000:]
        if code == 2:
            assert "another capture" in log and "Traceback" not in log, log[-2000:]
    rerun = run_workbench(*CAPTURE_ARGS, "--store", str(store))
    assert rerun.returncode == 0, rerun.stderr
    assert Store.open(store).sql("SELECT count(*), count(DISTINCT token_index) FROM tokens").fetchall() == [(TOKENS, TOKENS)]
    assert not list((store / "capture").glob(".tmp-*"))
