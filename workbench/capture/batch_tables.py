"""Turning one forward pass into the store's tables, off the main thread.

The main thread only queues the forward pass and an asynchronous copy of the hooked tensors
into pinned host memory; a writer thread waits for the copy, builds the Arrow tables and
writes them. So the accelerator computes batch i+1 while the host encodes batch i, and no
Python loop runs per token (token strings are an Arrow dictionary over the vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from workbench.models.handle import ModelHandle
from workbench.store.encoding import encode_activations
from workbench.store.layout import TOKENS_TABLE, activation_file


class TokenVocabulary:
    """Every token id's readable string, decoded once, as an Arrow dictionary."""

    def __init__(self, handle: ModelHandle) -> None:
        size = len(handle.tokenizer)
        self.strings = pa.array(handle.tokenizer.batch_decode([[i] for i in range(size)]), pa.string())

    def column(self, ids: np.ndarray) -> pa.DictionaryArray:
        return pa.DictionaryArray.from_arrays(pa.array(ids, pa.int32()), self.strings)


@dataclass
class HostCopy:
    """Hooked tensors on their way to host memory; wait() gives them once the copy is done."""

    tensors: dict[str, torch.Tensor]
    done: torch.cuda.Event | None

    @classmethod
    def start(cls, tensors: dict[str, torch.Tensor]) -> HostCopy:
        first = next(iter(tensors.values()), None)
        if first is None or first.device.type != "cuda":
            return cls({name: t.cpu() for name, t in tensors.items()}, None)
        host = {}
        for name, tensor in tensors.items():
            host[name] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host[name].copy_(tensor, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return cls(host, done)

    def wait(self) -> dict[str, torch.Tensor]:
        if self.done is not None:
            self.done.synchronize()
        return self.tensors


@dataclass
class PendingBatch:
    """Everything a writer thread needs to build one batch's tables."""

    ids: torch.Tensor  # [B, ctx] on the host
    docs: torch.Tensor  # [B, ctx]
    token_index: torch.Tensor  # [B, ctx]
    keep: torch.Tensor  # [B, ctx] bool
    activations: HostCopy
    probe_tables: dict[str, pa.Table]

    def tables(self, vocabulary: TokenVocabulary, ctx: int, dtype: str) -> dict[str, pa.Table]:
        keep = self.keep.reshape(-1).numpy()
        flat_index = self.token_index.reshape(-1).numpy()[keep]
        flat_ids = self.ids.reshape(-1).numpy()[keep]
        tables = {
            TOKENS_TABLE: pa.table(
                {
                    "token_index": pa.array(flat_index, pa.int64()),
                    "seq": pa.array(flat_index // ctx, pa.int64()),
                    "pos": pa.array((flat_index % ctx).astype(np.int32), pa.int32()),
                    "doc": pa.array(self.docs.reshape(-1).numpy()[keep], pa.int64()),
                    "token_id": pa.array(flat_ids.astype(np.int32), pa.int32()),
                    "token": vocabulary.column(flat_ids.astype(np.int32)),
                }
            )
        }
        keep_rows = torch.from_numpy(keep)
        for hook, acts in self.activations.wait().items():
            vectors = acts.reshape(keep_rows.numel(), -1)[keep_rows]
            tables[activation_file(hook)] = pa.table(
                {"token_index": pa.array(flat_index, pa.int64()), "act": encode_activations(vectors, dtype)}
            )
        tables.update(self.probe_tables)
        return tables
