"""Local SAE releases: `load_sae("release/id")` finds an SAE folder offline through a YAML file
in the shape of SAELens's pretrained_saes.yaml.

SAELens resolves a release only through the pretrained_saes.yaml inside its own package
(sae_lens.loading.pretrained_saes_directory reads it with importlib.resources, no setting
points it elsewhere) and then downloads the SAE from the release's Hugging Face repo_id, so
it cannot be pointed at local folders. This module reads and writes a file of the same shape:

    <release>:
      repo_id: local            # the SAEs are the local folders in `path`
      model: tiny-relu
      conversion_func: null
      saes:
      - id: blocks_2_topk
        path: /abs/or/relative/to/this/file
        l0: 8.0
        variance_explained: 0.71
        neuronpedia: tiny-relu/2-workbench/...   (when exported)

The file is WORKBENCH_RELEASES (os.pathsep-separated: the first one is written, all are read)
or ~/.cache/workbench/pretrained_saes.yaml. `workbench export-neuronpedia` and `workbench
train --release` add their SAE to it; writes replace the file atomically under a lock.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from sae.io import load_sae as load_sae_folder
from sae.model import SparseAutoencoder
from workbench.errors import WorkbenchError

RELEASES_ENV = "WORKBENCH_RELEASES"
DEFAULT_RELEASES = Path("~/.cache/workbench/pretrained_saes.yaml")


def release_files() -> list[Path]:
    """The release files read, in order (the first is the one written)."""
    given = [Path(p).expanduser() for p in os.environ.get(RELEASES_ENV, "").split(os.pathsep) if p]
    return given or [DEFAULT_RELEASES.expanduser()]


def read_releases(path: Path) -> dict[str, Any]:
    """The releases in one file ({} when it does not exist); a file that is not of that shape
    raises a WorkbenchError naming it."""
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise WorkbenchError(f"release file {path} is not valid YAML ({type(err).__name__})") from err
    data = data or {}
    ok = isinstance(data, dict) and all(
        isinstance(v, dict) and isinstance(v.get("saes"), list) and all(isinstance(s, dict) and "id" in s and "path" in s for s in v["saes"])
        for v in data.values()
    )
    if not ok:
        raise WorkbenchError(f"release file {path} is not in the shape of SAELens's pretrained_saes.yaml "
                             "(release: {repo_id, model, saes: [{id, path}, ...]})")  # fmt: skip
    return data


def resolve_release(spec: str) -> Path:
    """The folder of "release/id" in the first release file that lists it."""
    release, _, sae_id = spec.partition("/")
    if not release or not sae_id:
        raise WorkbenchError(f"'{spec}' is neither an SAE folder nor release/id")
    known = []
    for path in release_files():
        releases = read_releases(path)
        for entry in (releases.get(release) or {}).get("saes", []):
            if str(entry["id"]) == sae_id:
                folder = Path(str(entry["path"])).expanduser()
                return folder if folder.is_absolute() else path.parent / folder
        known += [f"{r}/{s['id']}" for r, v in releases.items() for s in v["saes"]]
    files = ", ".join(str(p) for p in release_files())
    listed = f"; listed: {', '.join(known[:8])}" if known else ""
    raise WorkbenchError(f"no SAE '{spec}' in the release file(s) {files}{listed}")


def load_sae(spec: str | Path, device: str = "cpu") -> tuple[SparseAutoencoder, dict[str, Any]]:
    """An SAE from a folder, or from "release/id" of a local release file (sae.io.load_sae's result)."""
    folder = Path(spec).expanduser()
    return load_sae_folder(folder if folder.is_dir() else resolve_release(str(spec)), device=device)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def check_release_name(release: str) -> None:
    """Refuse a release name that "release/id" could not spell (empty, or holding '/')."""
    if not release or "/" in release:
        raise WorkbenchError(f"release name '{release}' must be non-empty and without '/' (load_sae takes 'release/id')")


def register_release(release: str, sae_id: str, folder: str | Path, model: str, **fields: Any) -> Path:
    """Add (or replace) release/sae_id -> folder in the first release file, with SAELens's
    per-SAE fields given (l0, variance_explained, neuronpedia); returns the file."""
    check_release_name(release)
    if not sae_id:
        raise WorkbenchError(f"an SAE in release '{release}' needs a non-empty id")
    path = release_files()[0]
    try:
        with _locked(path):
            releases = read_releases(path)
            entry = releases.setdefault(release, {"repo_id": "local", "model": model, "conversion_func": None, "saes": []})
            if entry.get("model") != model:
                raise WorkbenchError(f"release '{release}' in {path} is of model '{entry.get('model')}', not '{model}'")
            row = {"id": sae_id, "path": str(Path(folder).resolve()), **{k: v for k, v in fields.items() if v is not None}}
            entry["saes"] = [s for s in entry["saes"] if str(s["id"]) != sae_id] + [row]
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(yaml.safe_dump(releases, sort_keys=False))
            os.replace(tmp, path)
    except OSError as err:
        raise WorkbenchError(f"cannot write the release file {path} ({err.strerror or err})") from err
    return path
