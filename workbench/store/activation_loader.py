"""A hook's stored activations delivered where training runs, as fast as the step takes them.

The training stream asks for chunks of the store (token ranges) one shuffle buffer at a
time. This loader answers on the training device, in the stored dtype (16-bit data stays
16-bit; the trainer converts on the device), in one of two modes:
- resident: the whole token range is read once, by a pool of threads straight from the
  Parquet buffers into pinned host memory and on to one tensor on the device (on the GPU
  when it fits). Every later buffer is a gather
  on the device: no disk, no host copy, no Python per row.
- streaming: when the range does not fit, each buffer is read by the same pool into pinned
  memory and copied to the device on a side stream, and the stream's next buffer is read
  in the background (prefetch) while the step consumes the current one.
Both modes return the same rows in the same order, so a run's batches do not depend on
the mode.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from workbench.store.activation_files import STORED_TORCH_DTYPE, ActivationFile, fill_rows

#: The share of free device memory (or free RAM, on the CPU) a resident copy may take.
RESIDENT_SHARE = {"cuda": 0.5, "cpu": 0.25}


def free_bytes(device: torch.device) -> int:
    """Memory free for a resident copy on the device: the GPU's free memory, or free RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def fits_resident(nbytes: int, device: torch.device) -> bool:
    """Whether a resident copy of nbytes takes at most RESIDENT_SHARE of the device's free memory."""
    return nbytes <= RESIDENT_SHARE.get(device.type, 0.25) * free_bytes(device)


def resident_bytes(rows: int, d: int, stored_dtype: str) -> int:
    """What a resident copy of rows stored vectors of width d takes."""
    return rows * d * STORED_TORCH_DTYPE[stored_dtype].itemsize


class HookActivationLoader:
    """Rows of one hook's activations by chunk, on `device`, resident or streamed.

    files: the hook's batch files; ranges: token_index [a, b) of each chunk, ascending and
    disjoint; resident: keep the whole span on the device (None: when it takes at most
    RESIDENT_SHARE of the free memory)."""

    def __init__(
        self, files: list[ActivationFile], stored_dtype: str, d: int, ranges: list[tuple[int, int]],
        device: torch.device | str = "cpu", resident: bool | None = None, threads: int | None = None,
    ) -> None:
        self.files, self.stored_dtype, self.d, self.ranges = files, stored_dtype, d, ranges
        self.device = self.resolve_device(device)
        self.dtype = STORED_TORCH_DTYPE[stored_dtype]
        self.span = (ranges[0][0], ranges[-1][1])
        if resident is None:
            resident = fits_resident(resident_bytes(self.span[1] - self.span[0], d, stored_dtype), self.device)
        self.resident = resident
        self.on_cuda = self.device.type == "cuda"
        self._pool = ThreadPoolExecutor(max_workers=threads or min(16, os.cpu_count() or 1))
        self._ahead = ThreadPoolExecutor(max_workers=1)
        self._cache: torch.Tensor | None = None
        self._pending: tuple[tuple[int, ...], Future] | None = None
        self._copy_stream = torch.cuda.Stream(self.device) if self.on_cuda else None
        self._lock = threading.Lock()

    @staticmethod
    def resolve_device(device: torch.device | str) -> torch.device:
        """The device rows are delivered on (a bare "cuda" is the current CUDA device)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        return device

    # ---- reading rows ------------------------------------------------------------------
    def _read_into(self, lo: int, hi: int, out: torch.Tensor) -> list[Future]:
        """Queue reads of token rows [lo, hi) into out, one task per file touched."""
        tasks = []
        for file in self.files:
            a, b = max(lo, file.first), min(hi, file.first + file.rows)
            if a < b:
                tasks.append(self._pool.submit(fill_rows, [file], self.stored_dtype, self.d, a, b, out[a - lo : b - lo]))
        return tasks

    def _host_buffer(self, rows: int) -> torch.Tensor:
        return torch.empty(rows, self.d, dtype=self.dtype, pin_memory=self.on_cuda)

    def _read_ranges(self, spans: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """The rows of the spans, concatenated, on the device (with the copy's event on CUDA)."""
        rows = sum(b - a for a, b in spans)
        host = self._host_buffer(rows)
        tasks, at = [], 0
        for a, b in spans:
            tasks += self._read_into(a, b, host[at : at + b - a])
            at += b - a
        for task in tasks:
            task.result()
        if not self.on_cuda:
            return host, None
        with torch.cuda.stream(self._copy_stream):
            data = host.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._copy_stream)
        return data, done

    def _load_resident(self) -> torch.Tensor:
        """Read the whole span onto the device once: files in parallel, each through its
        own pinned buffer, copied to its slice of the cache as soon as it is read."""
        lo, hi = self.span
        cache = torch.empty(hi - lo, self.d, dtype=self.dtype, device=self.device)
        if not self.on_cuda:
            for task in self._read_into(lo, hi, cache):
                task.result()
            return cache

        def read_and_copy(file: ActivationFile, a: int, b: int) -> None:
            host = self._host_buffer(b - a)
            fill_rows([file], self.stored_dtype, self.d, a, b, host)
            stream = torch.cuda.Stream(self.device)
            with torch.cuda.stream(stream):
                cache[a - lo : b - lo].copy_(host, non_blocking=True)
            stream.synchronize()

        tasks = []
        for file in self.files:
            a, b = max(lo, file.first), min(hi, file.first + file.rows)
            if a < b:
                tasks.append(self._pool.submit(read_and_copy, file, a, b))
        for task in tasks:
            task.result()
        return cache

    # ---- the stream's interface --------------------------------------------------------
    def load(self, chunks: list[int]) -> torch.Tensor:
        """The chunks' rows, concatenated in the order given, on the device."""
        spans = [self.ranges[c] for c in chunks]
        if self.resident:
            with self._lock:
                if self._cache is None:
                    self._cache = self._load_resident()
            lo = self.span[0]
            return torch.cat([self._cache[a - lo : b - lo] for a, b in spans])
        key = tuple(chunks)
        if self._pending is not None and self._pending[0] == key:
            data, done = self._pending[1].result()
            self._pending = None
        else:
            data, done = self._read_ranges(spans)
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)
            data.record_stream(torch.cuda.current_stream(self.device))
        return data

    def prefetch(self, chunks: list[int]) -> None:
        """Start reading the chunks the stream will ask for next (streaming mode only)."""
        if self.resident or (self._pending is not None and self._pending[0] == tuple(chunks)):
            return
        spans = [self.ranges[c] for c in chunks]
        self._pending = (tuple(chunks), self._ahead.submit(self._read_ranges, spans))

    def close(self) -> None:
        self._ahead.shutdown(wait=True)
        self._pool.shutdown(wait=True)
