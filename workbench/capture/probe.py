"""The probe contract: a per-batch reduction on the device that becomes a few store rows.

A probe names the hooks it needs; for every batch the runner hands it those hooks' tensors
and the batch's token bookkeeping, and the probe returns small Arrow tables (counts, maxima,
routing rows...). The runner writes them in the same atomic batch folder as the tokens, so a
killed capture never leaves half a batch, and analyses aggregate the per-batch rows with SQL.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import pyarrow as pa
import torch

from workbench.models.handle import ModelHandle


@dataclass(frozen=True)
class BatchContext:
    """Where a batch sits in the capture.

    tokens: [batch, ctx] token ids on the model's device.
    token_index: [batch, ctx] global row id of every position in the `tokens` table.
    keep: [batch, ctx] bool, False for positions beyond the requested token count (the
    last batch may be cut short); probes must ignore those positions.
    batch: the batch number (also a column probes may add to their rows).
    """

    tokens: torch.Tensor
    token_index: torch.Tensor
    keep: torch.Tensor
    batch: int


class Probe:
    """Base class: subclasses set `name` and implement hook_names and reduce."""

    name: str = ""

    def hook_names(self, handle: ModelHandle) -> list[str]:
        """TransformerLens hook names whose outputs this probe reads."""
        raise NotImplementedError

    def attach(self, handle: ModelHandle) -> AbstractContextManager[None]:
        """Extra module hooks (e.g. per-expert outputs) live for the whole capture."""
        return nullcontext()

    def reduce(self, ctx: BatchContext, cache: dict[str, torch.Tensor]) -> dict[str, pa.Table]:
        """Turn one batch's hooked tensors into rows: {table name: Arrow table}."""
        raise NotImplementedError
