"""Reading a hook's dense activations from a store's batch files, with one copy per value.

Each finished batch holds one Parquet file per hook: a fixed-size list column `act` of
float32 (or the 16-bit patterns of float16 / bfloat16) with no compression and no
dictionary. pyarrow decodes a file's pages on its own threads into Arrow buffers; the
values buffer is then viewed as a tensor in the stored dtype and copied once, straight
into the caller's destination (a chunk, a pinned staging buffer, a device cache). No
Python runs per row and 16-bit data stays 16-bit until the caller converts it.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from workbench.errors import WorkbenchError
from workbench.store.layout import TOKENS_TABLE, activation_file

#: The tensor dtype each stored dtype is read as (16-bit floats come back as themselves).
STORED_TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ActivationFile:
    """One batch's activation file for a hook: token_index [first, first + rows)."""

    path: Path
    first: int
    rows: int


def list_activation_files(batches: list[Path], hook: str) -> list[ActivationFile]:
    """The hook's file in each finished batch folder, with its token range (footers only)."""
    files, first = [], 0
    for batch in batches:
        rows = pq.ParquetFile(batch / f"{TOKENS_TABLE}.parquet").metadata.num_rows
        files.append(ActivationFile(batch / f"{activation_file(hook)}.parquet", first, rows))
        first += rows
    return files


def _values(chunk: pa.Array, dtype: str, d: int) -> torch.Tensor:
    """A fixed-size list chunk's values as an [n, d] tensor viewing Arrow's buffer (read it,
    never write it)."""
    values = chunk.flatten()  # the chunk's own rows of the child array, no copy
    torch_dtype = STORED_TORCH_DTYPE[dtype]
    size = torch.empty((), dtype=torch_dtype).element_size()
    flat = torch.frombuffer(values.buffers()[1], dtype=torch_dtype, count=len(values), offset=values.offset * size)
    return flat.view(-1, d)


def pooled_empty(rows: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised [rows, d] CPU tensor in Arrow's memory pool. Large torch allocations
    come fresh from the OS each time, and touching new pages costs more than the copy that
    fills them; the pool keeps freed chunks and hands them out again."""
    nbytes = rows * d * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.empty(rows, d, dtype=dtype)
    return torch.frombuffer(pa.allocate_buffer(nbytes), dtype=dtype).view(rows, d)


def read_column(file: ActivationFile) -> pa.ChunkedArray:
    """The file's `act` column, decoded by pyarrow (its threads; the GIL is released)."""
    try:
        return pq.read_table(file.path, columns=["act"], use_threads=True, memory_map=True).column("act")
    except (OSError, pa.ArrowException, KeyError) as err:
        raise WorkbenchError(f"cannot read {file.path} ({err}); the store may be damaged") from err


def copy_rows(file: ActivationFile, column: pa.ChunkedArray, dtype: str, d: int, lo: int, hi: int, out: torch.Tensor) -> None:
    """Copy rows [lo, hi) of the file's column (file-relative) into out [hi - lo, d] (any dtype,
    any device: a float32 out converts, a 16-bit out of the stored dtype copies the bits)."""
    if dtype not in STORED_TORCH_DTYPE:
        raise WorkbenchError(f"{file.path}: unknown stored activation dtype '{dtype}'")
    row = 0
    for chunk in column.chunks:
        n = len(chunk)
        a, b = max(lo - row, 0), min(hi - row, n)
        if a < b:
            if chunk.type.list_size != d:
                raise WorkbenchError(f"{file.path} holds vectors of width {chunk.type.list_size}, the store says {d}")
            out[row + a - lo : row + b - lo].copy_(_values(chunk, dtype, d)[a:b])
        row += n
    if row != file.rows:
        raise WorkbenchError(f"{file.path} holds {row} rows, its batch's tokens {file.rows}; the store may be damaged")


def fill_rows(files: list[ActivationFile], dtype: str, d: int, lo: int, hi: int, out: torch.Tensor) -> None:
    """Copy token_index rows [lo, hi) of the hook, spread over its files, into out [hi - lo, d]."""
    for file in files:
        a, b = max(lo, file.first), min(hi, file.first + file.rows)
        if a < b:
            copy_rows(file, read_column(file), dtype, d, a - file.first, b - file.first, out[a - lo : b - lo])


def iter_rows(
    files: list[ActivationFile], dtype: str, d: int, lo: int, hi: int, chunk_tokens: int, out_dtype: torch.dtype,
    ahead: int = 2,
) -> Iterator[torch.Tensor]:
    """Token rows [lo, hi) in chunks of chunk_tokens (the last shorter), each filled straight
    from the files; the next `ahead` files are decoded on a thread while one is copied."""
    touched = [f for f in files if f.first < hi and f.first + f.rows > lo]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = [pool.submit(read_column, f) for f in touched[:ahead]]
        out, filled, pos = None, 0, lo
        for i, file in enumerate(touched):
            column = pending.pop(0).result()
            if i + ahead < len(touched):
                pending.append(pool.submit(read_column, touched[i + ahead]))
            a, b = max(lo, file.first), min(hi, file.first + file.rows)
            while a < b:
                if out is None:
                    out, filled = pooled_empty(min(chunk_tokens, hi - pos), d, out_dtype), 0
                take = min(b - a, len(out) - filled)
                copy_rows(file, column, dtype, d, a - file.first, a - file.first + take, out[filled : filled + take])
                filled, a, pos = filled + take, a + take, pos + take
                if filled == len(out):
                    yield out
                    out = None
