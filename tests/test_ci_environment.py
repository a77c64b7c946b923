"""Under CI, the suite runs in the virtual environment .ci/run made, which sees none of the
machine's site-packages, with the versions .ci/constraints.txt pins. If the suite ran in
the machine's own Python, a package installed there by hand could hide a missing install
step; this test fails instead."""

from __future__ import annotations

import os
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(os.environ.get("CI") != "true", reason="checks the environment .ci/run makes (CI=true)")


def pinned() -> dict[str, str]:
    pins = {}
    for line in (REPO / ".ci" / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, wanted = line.partition("==")
            pins[name] = wanted
    return pins


def test_runs_in_a_fresh_isolated_environment():
    assert sys.prefix != sys.base_prefix, "the suite runs in the machine's Python, not .ci/run's virtual environment"
    config = (Path(sys.prefix) / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in config
    assert not any("site-packages" in p and not p.startswith(sys.prefix) for p in sys.path), sys.path


def test_pinned_versions_are_the_ones_installed():
    for name, wanted in pinned().items():
        assert version(name).split("+")[0] == wanted, f"{name} {version(name)} installed, .ci/constraints.txt pins {wanted}"


def test_the_browser_test_can_run():
    assert Path("/usr/bin/chromium").exists(), ".ci/run should have installed Debian's chromium"
