"""The built-in corpus: the Python standard library's own source files, present on every machine.

Documents are whole `.py` files (their docstrings and comments included), read from
sysconfig's stdlib folder in sorted path order. Installed third-party packages
(site-packages, dist-packages) are never part of it, so two machines with the same Python
give the same corpus. A file is held out for evaluation when a hash of its relative path
says so: the split of a file never depends on which other files a distribution ships
(Debian, for one, leaves the test suite out).
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

from workbench.errors import WorkbenchError

SPLITS = ("train", "heldout")
HELDOUT_PER_MILLE = 25  # about 2.5% of the files
_SKIPPED_FOLDERS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> Path:
    """The folder holding this interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(relative_path: str) -> bool:
    """Whether a stdlib file (path relative to the stdlib root, '/'-separated) is held out."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 1000 < HELDOUT_PER_MILLE


def corpus_files(split: str = "train") -> list[Path]:
    """Sorted stdlib `.py` files of one split."""
    if split not in SPLITS:
        raise WorkbenchError(f"unknown corpus split '{split}'; use one of: {', '.join(SPLITS)}")
    root = stdlib_root()
    if not root.is_dir():
        raise WorkbenchError(f"the Python standard library folder {root} is missing; the builtin corpus needs it")
    want_heldout = split == "heldout"
    files = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if _SKIPPED_FOLDERS.intersection(relative.parts[:-1]):
            continue
        if is_heldout(relative.as_posix()) == want_heldout:
            files.append(path)
    return files


def builtin_documents(split: str = "train") -> list[str]:
    """The texts of one split, one per source file, in sorted path order.

    Files that are not valid UTF-8 (a handful of encoding tests) and empty files are left out.
    """
    documents = []
    for path in corpus_files(split):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            documents.append(text)
    if not documents:
        raise WorkbenchError(f"the builtin corpus has no '{split}' documents under {stdlib_root()}")
    return documents
