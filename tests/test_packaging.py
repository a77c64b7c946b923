"""A built wheel is a complete install: it carries the zoo, and an installed copy runs from anywhere.

The wheel is built from a copy of the build inputs (as a fresh clone has them) and installed,
with --no-deps --no-index, into a new virtual environment that sees this interpreter's
site-packages for the dependencies (torch, transformer-lens, ...) but not the source tree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from workbench.models.zoo import CONFIG_FILE, RECORD_FILE, TOKENIZER_FILE, WEIGHTS_FILE, ZOO, weights_fingerprint, zoo_dir

REPO = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "workbench", "sae", "app", "data")
ZOO_FILES = (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE, RECORD_FILE)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip wheel` builds from a clean copy of the repository's build inputs."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    for name in BUILD_INPUTS:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "stores"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(path, source / name)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(root / "dist")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (built,) = (root / "dist").glob("*.whl")
    return built


def test_wheel_carries_the_zoo_and_every_module(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for model in ZOO:
            for file in ZOO_FILES:
                member = f"workbench/zoo_data/{model}/{file}"
                assert member in names, f"{member} is not in the wheel"
                assert archive.read(member) == (zoo_dir(model) / file).read_bytes()
    sources = {p.relative_to(REPO).as_posix() for top in ("workbench", "sae", "app") for p in (REPO / top).rglob("*.py")}
    assert sources - names == set()
    assert not any(name.startswith(("tests/", "bench/", "data/")) for name in names)


def test_installed_wheel_runs_its_zoo_outside_the_repository(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    # a plain path line: the dependencies installed here, without this interpreter's .pth files
    # (one of which is the editable install that maps `workbench` to a source tree)
    dependencies = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "dependencies.pth").write_text("\n".join(sorted(dependencies)) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(*argv: str | Path) -> str:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=elsewhere, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    run(python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", wheel)
    installed_zoo = site / "workbench" / "zoo_data"
    listing = run(venv / "bin" / "workbench", "zoo", "list")
    assert f"zoo folder: {installed_zoo}" in listing
    assert all(line.split("│")[5].strip() == "yes" for line in listing.splitlines() if line.startswith("│ tiny-"))
    assert listing.count("│ tiny-") == len(ZOO)

    probe = (
        "import json, workbench; from workbench.models.registry import load_model; "
        "from workbench.commands.app import APP_SCRIPT; h = load_model('tiny-moe'); "
        "print(json.dumps([workbench.__file__, h.extra['folder'], h.fingerprint, str(APP_SCRIPT), APP_SCRIPT.is_file()]))"
    )
    module, folder, fingerprint, app_script, app_exists = json.loads(run(python, "-c", probe).splitlines()[-1])
    assert Path(module).is_relative_to(site) and Path(folder) == installed_zoo / "tiny-moe"
    assert fingerprint == weights_fingerprint(zoo_dir("tiny-moe") / WEIGHTS_FILE)
    assert Path(app_script).is_relative_to(site) and app_exists
