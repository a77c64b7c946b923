"""The example notebook runs top to bottom against a real store."""

from __future__ import annotations

import subprocess
import sys

from tests.cli_process import REPO


def test_notebook_example_runs():
    result = subprocess.run([sys.executable, "examples/notebook.py"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mean squared norm" in result.stdout
    assert "tokens" in result.stdout and "documents" in result.stdout
