"""Cutting documents into fixed-length context windows, deterministically.

The documents' tokens are concatenated into one stream and cut into windows of the model's
special prefix (e.g. BOS), ctx minus the specials content tokens, and suffix (e.g. [SEP]).
Window i is always the same window, so a resumed capture can skip the windows of the
batches already stored and continue exactly where the killed one stopped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from workbench.errors import WorkbenchError
from workbench.models.handle import ModelHandle

SPECIAL_DOC = -1  # doc id recorded for the special tokens capture adds
TOKENIZE_GROUP = 64  # documents tokenized per call


@dataclass(frozen=True)
class Window:
    token_ids: list[int]
    docs: list[int]


def iter_windows(handle: ModelHandle, documents: list[str], ctx: int) -> Iterator[Window]:
    """Yield windows of exactly ctx tokens; a trailing partial window is dropped."""
    prefix, suffix = handle.prefix_ids, handle.suffix_ids
    body = ctx - len(prefix) - len(suffix)
    if body < 1:
        raise WorkbenchError(f"--ctx {ctx} leaves no room for text after the model's {len(prefix) + len(suffix)} special tokens")
    ids: list[int] = []
    docs: list[int] = []
    for first in range(0, len(documents), TOKENIZE_GROUP):
        group = handle.tokenize_many(documents[first : first + TOKENIZE_GROUP])
        for doc_id, new in enumerate(group, start=first):
            ids.extend(new)
            docs.extend([doc_id] * len(new))
            start = 0
            while len(ids) - start >= body:
                end = start + body
                yield Window(
                    token_ids=prefix + ids[start:end] + suffix,
                    docs=[SPECIAL_DOC] * len(prefix) + docs[start:end] + [SPECIAL_DOC] * len(suffix),
                )
                start = end
            del ids[:start], docs[:start]


def iter_batches(windows: Iterator[Window], batch_size: int, skip: set[int]) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Group windows into (batch number, token ids [B, ctx], docs [B, ctx]), leaving out stored batches."""
    batch: list[Window] = []
    number = 0
    for window in windows:
        batch.append(window)
        if len(batch) == batch_size:
            if number not in skip:
                yield number, torch.tensor([w.token_ids for w in batch]), torch.tensor([w.docs for w in batch])
            number += 1
            batch = []
    if batch and number not in skip:
        yield number, torch.tensor([w.token_ids for w in batch]), torch.tensor([w.docs for w in batch])
