"""Dense activations -> Arrow columns: one row per token, its vector as a fixed-size list.

A fixed-size list (FLOAT[d] in DuckDB) stores each token's d values as one contiguous run of
the column's values buffer, so a batch file reads back as one [rows, d] block; the long
(token, dim, value) layout would repeat both keys for every value. DuckDB has no float16,
so half precision is stored as the raw 16-bit patterns in SMALLINT[d] (exact);
workbench.store.activation_files reads them back.
"""

from __future__ import annotations

import pyarrow as pa
import torch

STORAGE_DTYPES = ("float32", "float16", "bfloat16")


def encode_activations(acts: torch.Tensor, dtype: str) -> pa.FixedSizeListArray:
    """[n, d] tensor -> fixed-size list column in the stored dtype."""
    n, d = acts.shape
    if dtype == "float32":
        flat = acts.to(torch.float32).contiguous().cpu().numpy().reshape(-1)
        values = pa.array(flat, type=pa.float32())
    else:
        torch_dtype = torch.float16 if dtype == "float16" else torch.bfloat16
        bits = acts.to(torch_dtype).contiguous().view(torch.int16).cpu().numpy().reshape(-1)
        values = pa.array(bits, type=pa.int16())
    return pa.FixedSizeListArray.from_arrays(values, d)
