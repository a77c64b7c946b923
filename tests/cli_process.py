"""Run the real `workbench` command in a subprocess, as a user or a second program would,
or its main() in this process (to see what this process has set up, e.g. a registered rule)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def workbench_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "workbench.cli", *args]


def run_workbench(*args: str, timeout: float = 300, env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `workbench ARGS` to completion, capturing its output. env: variables to set in
    the command's environment (None removes one), e.g. {"TRITON_INTERPRET": None}."""
    full = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name, value in (env or {}).items():
        if value is None:
            full.pop(name, None)
        else:
            full[name] = value
    return subprocess.run(workbench_argv(*args), capture_output=True, text=True, timeout=timeout, cwd=REPO, env=full)


def start_workbench(*args: str, log: Path) -> subprocess.Popen[bytes]:
    """Start `workbench ARGS` in the background, output to a log file."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    handle = open(log, "wb")
    return subprocess.Popen(workbench_argv(*args), stdout=handle, stderr=subprocess.STDOUT, cwd=REPO, env=env)


def run_in_process(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Run the CLI's main() in-process; returns (exit code, stderr)."""
    from workbench.cli import main

    monkeypatch.setattr(sys, "argv", ["workbench", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err
