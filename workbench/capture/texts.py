"""Reading the documents to capture from: a text file, a folder of them, JSONL, `builtin` (the
Python standard library's source) or `builtin-english` (the Python reference manual's prose).

Everything is read and checked before the model loads or the store is touched, so a bad
data argument costs nothing and changes nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.models.english_corpus import ENGLISH_SPEC, english_documents

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".text", ".json", ".jsonl", ".csv", ".html", ".tex"}


@dataclass(frozen=True)
class Corpus:
    """Documents in a fixed order, with a fingerprint of what was read (for resume checks)."""

    spec: str
    documents: list[str]
    fingerprint: str


def _decode(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise WorkbenchError(f"data file {path} is not UTF-8 text (byte {err.start}); convert it first") from err
    except OSError as err:
        raise WorkbenchError(f"cannot read data file {path}: {err.strerror}") from err


def _jsonl_documents(path: Path) -> list[str]:
    docs = []
    for number, line in enumerate(_decode(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise WorkbenchError(f"{path}:{number} is not valid JSON ({err.msg})") from err
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise WorkbenchError(f'{path}:{number} has no string "text" field')
        docs.append(record["text"])
    return docs


def _file_documents(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        return _jsonl_documents(path)
    return [_decode(path)]


def load_corpus(spec: str) -> Corpus:
    """Documents named by spec; missing, empty or non-UTF-8 data raises WorkbenchError."""
    if spec == "builtin":
        from workbench.models.corpus import builtin_documents

        docs = builtin_documents("train")
    elif spec == ENGLISH_SPEC:
        docs = english_documents()
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise WorkbenchError(f"data '{spec}' does not exist (give a text file, a folder, a .jsonl file, `builtin` or `{ENGLISH_SPEC}`)")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not files:
                raise WorkbenchError(f"data folder {path} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
            docs = [doc for f in files for doc in _file_documents(f)]
        else:
            docs = _file_documents(path)
        spec = str(path.resolve())
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise WorkbenchError(f"data '{spec}' is empty: no text to capture")
    digest = hashlib.sha256()
    for doc in docs:
        digest.update(hashlib.sha256(doc.encode()).digest())
    return Corpus(spec=spec, documents=docs, fingerprint=digest.hexdigest()[:16])
