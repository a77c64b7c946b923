"""Cutting documents into fixed-length context windows, deterministically.

The documents' tokens are concatenated into one stream and cut into windows of the model's
special prefix (e.g. BOS), ctx minus the specials content tokens, and suffix (e.g. [SEP]).
Window i is always the same window, so a resumed capture can skip the windows of the
batches already stored and continue exactly where the killed one stopped. Windows are numpy
slices and batches are prepared on a background thread, ahead of the forward pass.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch

from workbench.errors import WorkbenchError
from workbench.models.handle import ModelHandle

SPECIAL_DOC = -1  # doc id recorded for the special tokens capture adds
TOKENIZE_GROUP = 16  # documents tokenized per call (a batch rarely needs more)
PREFETCH_BATCHES = 4


def iter_windows(handle: ModelHandle, documents: list[str], ctx: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (token ids [ctx], doc ids [ctx]) windows; a trailing partial window is dropped."""
    prefix = np.asarray(handle.prefix_ids, dtype=np.int64)
    suffix = np.asarray(handle.suffix_ids, dtype=np.int64)
    body = ctx - len(prefix) - len(suffix)
    if body < 1:
        raise WorkbenchError(f"--ctx {ctx} leaves no room for text after the model's {len(prefix) + len(suffix)} special tokens")
    special_before = np.full(len(prefix), SPECIAL_DOC, dtype=np.int64)
    special_after = np.full(len(suffix), SPECIAL_DOC, dtype=np.int64)
    ids = np.empty(0, dtype=np.int64)
    docs = np.empty(0, dtype=np.int64)
    for first in range(0, len(documents), TOKENIZE_GROUP):
        group = handle.tokenize_many(documents[first : first + TOKENIZE_GROUP])
        lengths = [len(g) for g in group]
        ids = np.concatenate([ids, np.fromiter((t for g in group for t in g), dtype=np.int64, count=sum(lengths))])
        docs = np.concatenate([docs, np.repeat(np.arange(first, first + len(group), dtype=np.int64), lengths)])
        whole = len(ids) // body * body
        for start in range(0, whole, body):
            end = start + body
            yield (
                np.concatenate([prefix, ids[start:end], suffix]),
                np.concatenate([special_before, docs[start:end], special_after]),
            )
        ids, docs = ids[whole:], docs[whole:]


def _batches(windows: Iterator[tuple[np.ndarray, np.ndarray]], batch_size: int, skip: set[int]) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    batch: list[tuple[np.ndarray, np.ndarray]] = []
    number = 0
    for window in windows:
        batch.append(window)
        if len(batch) == batch_size:
            if number not in skip:
                yield number, torch.from_numpy(np.stack([w[0] for w in batch])), torch.from_numpy(np.stack([w[1] for w in batch]))
            number += 1
            batch = []
    if batch and number not in skip:
        yield number, torch.from_numpy(np.stack([w[0] for w in batch])), torch.from_numpy(np.stack([w[1] for w in batch]))


def iter_batches(
    windows: Iterator[tuple[np.ndarray, np.ndarray]], batch_size: int, skip: set[int], last: int | None = None
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(batch number, token ids [B, ctx], doc ids [B, ctx]) up to batch `last`, leaving out stored batches.

    Tokenizing and windowing run on a thread a few batches ahead of the caller.
    """
    ready: queue.Queue[tuple[int, torch.Tensor, torch.Tensor] | BaseException | None] = queue.Queue(maxsize=PREFETCH_BATCHES)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in _batches(windows, batch_size, skip):
                if stop.is_set() or (last is not None and item[0] > last):
                    break
                ready.put(item)
        except BaseException as err:  # raised again in the caller's thread
            ready.put(err)
            return
        ready.put(None)

    thread = threading.Thread(target=produce, name="capture-tokenizer", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                ready.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
