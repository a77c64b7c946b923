"""Bad input gets one line on stderr, exit code 2, and leaves a stored capture untouched."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.cli_process import run_workbench

GOOD = ["--model", "tiny-relu", "--data", "builtin", "--hooks", "blocks.0.hook_resid_post", "--tokens", "256", "--ctx", "64", "--batch-size", "2"]


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("stored") / "store"
    done = run_workbench("capture", *GOOD, "--store", str(store))
    assert done.returncode == 0, done.stderr
    return store


def _with(option: str, value: str) -> list[str]:
    args = list(GOOD)
    args[args.index(option) + 1] = value
    return args


def _bad_files(tmp: Path) -> dict[str, str]:
    (tmp / "empty.txt").write_text("   \n")
    (tmp / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (tmp / "bad.jsonl").write_text('{"text": "fine"}\n{"title": "no text field"}\n')
    return {name: str(tmp / name) for name in ("empty.txt", "latin1.txt", "bad.jsonl")}


CASES = {
    "unknown model": (lambda t: _with("--model", "no-such-model"), "no-such-model"),
    "unknown hook": (lambda t: _with("--hooks", "blocks.0.hook_resid_pots"), "closest: blocks.0.hook_resid_post"),
    "missing data": (lambda t: _with("--data", str(t / "nowhere.txt")), "does not exist"),
    "empty data": (lambda t: _with("--data", _bad_files(t)["empty.txt"]), "empty"),
    "non-UTF-8 data": (lambda t: _with("--data", _bad_files(t)["latin1.txt"]), "not UTF-8"),
    "malformed jsonl": (lambda t: _with("--data", _bad_files(t)["bad.jsonl"]), '"text"'),
    "zero tokens": (lambda t: _with("--tokens", "0"), "--tokens must be positive"),
    "negative tokens": (lambda t: _with("--tokens", "-5"), "--tokens must be positive"),
    "different model": (lambda t: _with("--model", "tiny-moe"), "holds captures of model tiny-relu"),
    "different hooks": (lambda t: _with("--hooks", "blocks.0.mlp.hook_post"), "other settings"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_one_line_exit_2_store_untouched(case, stored, tmp_path):
    make_args, expected = CASES[case]
    before = _snapshot(stored)
    result = run_workbench("capture", *make_args(tmp_path), "--store", str(stored))
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0]
    assert _snapshot(stored) == before


def test_store_written_by_another_model_is_refused_by_width(tmp_path):
    """A store of tiny-moe refuses tiny-relu before anything is written."""
    store = tmp_path / "moe"
    first = run_workbench("capture", *_with("--model", "tiny-moe"), "--store", str(store))
    assert first.returncode == 0, first.stderr
    before = _snapshot(store)
    second = run_workbench("capture", *GOOD, "--store", str(store))
    assert second.returncode == 2 and "holds captures of model tiny-moe" in second.stderr
    assert _snapshot(store) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere; the check below uses a read-only file system path instead")
def test_unwritable_store_path_non_root(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result = run_workbench("capture", *GOOD, "--store", str(locked / "store"))
    assert result.returncode == 2 and "cannot write store" in result.stderr


def test_unwritable_store_path(tmp_path):
    # /proc refuses new folders even for root
    result = run_workbench("capture", *GOOD, "--store", "/proc/workbench-store")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "cannot write store" in result.stderr


def test_info_on_a_folder_that_is_not_a_store(tmp_path):
    result = run_workbench("info", str(tmp_path))  # empty: what a starting capture has made so far
    assert result.returncode == 0 and "being created" in result.stdout
    (tmp_path / "notes.txt").write_text("mine")
    result = run_workbench("info", str(tmp_path))
    assert result.returncode == 2 and "not a workbench store" in result.stderr


def test_hooks_lists_what_the_unknown_hook_message_points_to():
    result = run_workbench("hooks", "--model", "tiny-relu", "blocks.0.hook_resid_*")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["blocks.0.hook_resid_mid", "blocks.0.hook_resid_post", "blocks.0.hook_resid_pre"]
