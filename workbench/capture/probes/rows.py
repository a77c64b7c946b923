"""Collecting a probe's per-batch rows column by column, then one Arrow table with a batch column."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch


class Rows:
    """Typed columns filled by add(); tensors give the row count, scalars are repeated."""

    def __init__(self, **types: pa.DataType) -> None:
        self.types = {"batch": pa.int32(), **types}
        self.parts: dict[str, list[np.ndarray]] = {name: [] for name in self.types}

    def add(self, **columns: torch.Tensor | int | float | str) -> None:
        missing = set(self.types) - {"batch"} - set(columns)
        if missing:
            raise ValueError(f"rows lack columns {sorted(missing)}")
        lengths = {int(v.numel()) for v in columns.values() if isinstance(v, torch.Tensor)}
        if len(lengths) != 1:
            raise ValueError(f"columns of one add() need one length, got {sorted(lengths)}")
        n = lengths.pop()
        for name, value in columns.items():
            if isinstance(value, torch.Tensor):
                if value.is_floating_point() and value.dtype not in (torch.float32, torch.float64):
                    value = value.float()  # numpy has no bfloat16
                self.parts[name].append(value.detach().reshape(-1).cpu().numpy())
            else:
                self.parts[name].append(np.full(n, value, dtype=object if isinstance(value, str) else None))

    def table(self, batch: int) -> pa.Table:
        """The rows so far; batch fills the leading `batch` column."""
        arrays = {}
        n = sum(len(p) for p in next(iter(v for k, v in self.parts.items() if k != "batch")))
        for name, kind in self.types.items():
            if name == "batch":
                arrays[name] = pa.array(np.full(n, batch, dtype=np.int32), kind)
            else:
                parts = self.parts[name]
                arrays[name] = pa.array(np.concatenate(parts), kind) if parts else pa.array([], kind)
        return pa.table(arrays)
