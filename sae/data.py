"""Where training activations come from: the store, a live model, synthetic data, a tensor.

Each source yields float32 batches [B, d_in] from a deterministic stream, and can start at
any batch number without replaying the ones before, which is what makes resume exact.
The store and live-model sources share one shape: data is cut into chunks (token ranges of
the store; groups of context windows run through the model); each epoch visits the chunks
in a seeded random order, a few at a time (the shuffle buffer), and shuffles the tokens of
those chunks together. Memory holds one buffer, never the whole table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch

from workbench.errors import WorkbenchError


class ActivationSource(Protocol):
    d_in: int

    def batches(self, batch_size: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """Float32 [batch_size, d_in] batches of the stream, from batch number start_batch on."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the training record says about the data."""
        ...


def _seeded(*parts: int) -> torch.Generator:
    """A generator whose seed mixes several integers (seed, epoch, buffer)."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part) + 1) % (2**62)
    return torch.Generator().manual_seed(value)


class ChunkedShuffleStream:
    """Epochs over chunks in random order, shuffled within buffers of `buffer_chunks` chunks.

    chunk_sizes: token count of each chunk; load(chunk ids) -> [sum of their sizes, d] in
    the order given, on any device (the shuffle runs there); prefetch(chunk ids), if given,
    is told which chunks load will be asked for next, so it can read them meanwhile. The
    stream is the concatenation, over epochs and buffers, of each buffer's shuffled tokens;
    batch b is tokens [b*B, (b+1)*B) of it. The permutations come from seeded CPU
    generators, so the stream is the same on every device.
    """

    def __init__(
        self, chunk_sizes: list[int], load: Callable[[list[int]], torch.Tensor], buffer_chunks: int, seed: int,
        prefetch: Callable[[list[int]], None] | None = None,
    ) -> None:
        if not chunk_sizes or sum(chunk_sizes) == 0:
            raise WorkbenchError("no activations to train on: the data source is empty")
        self.chunk_sizes = chunk_sizes
        self.load = load
        self.prefetch = prefetch
        self.buffer_chunks = max(1, buffer_chunks)
        self.seed = seed
        self.epoch_tokens = sum(chunk_sizes)

    def _buffers(self, epoch: int) -> list[list[int]]:
        order = torch.randperm(len(self.chunk_sizes), generator=_seeded(self.seed, epoch)).tolist()
        return [order[i : i + self.buffer_chunks] for i in range(0, len(order), self.buffer_chunks)]

    def _buffer_tokens(self, epoch: int, number: int, chunks: list[int]) -> torch.Tensor:
        data = self.load(chunks)
        perm = torch.randperm(len(data), generator=_seeded(self.seed, epoch, number + 1))
        return data[perm.to(data.device)]

    def tokens_from(self, position: int) -> Iterator[torch.Tensor]:
        """Pieces of the stream starting at token `position`, one buffer (or part) at a time."""
        epoch, offset = divmod(position, self.epoch_tokens)
        buffers = self._buffers(epoch)
        while True:
            upcoming = self._buffers(epoch + 1)
            for number, chunks in enumerate(buffers):
                size = sum(self.chunk_sizes[c] for c in chunks)
                if offset >= size:
                    offset -= size
                    continue
                tokens = self._buffer_tokens(epoch, number, chunks)[offset:]
                if self.prefetch is not None:
                    self.prefetch(buffers[number + 1] if number + 1 < len(buffers) else upcoming[0])
                yield tokens
                offset = 0
            epoch, buffers = epoch + 1, upcoming

    def batches(self, batch_size: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        pending: list[torch.Tensor] = []
        held = 0
        for piece in self.tokens_from(start_batch * batch_size):
            pending.append(piece)
            held += len(piece)
            while held >= batch_size:
                joined = torch.cat(pending) if len(pending) > 1 else pending[0]
                yield joined[:batch_size]
                pending, held = [joined[batch_size:]], held - batch_size


class StoreSource:
    """Activations of one hook from a capture store, streamed in shuffled chunks.

    start / stop: train on token_index in [start, stop) only (e.g. keep a held-out tail).
    device: where batches are delivered, in the stored dtype (the trainer converts there);
    resident: hold the whole range on that device (None: when it fits, see
    workbench.store.activation_loader)."""

    def __init__(
        self, store: Any, hook: str, chunk_tokens: int = 65536, buffer_chunks: int = 4, seed: int = 0,
        start: int = 0, stop: int | None = None, device: str | torch.device = "cpu", resident: bool | None = None,
    ) -> None:
        from workbench.store.activation_loader import HookActivationLoader

        hooks = store.hooks
        if hook not in hooks:
            stored = ", ".join(sorted(hooks)) or "none"
            raise WorkbenchError(f"hook '{hook}' is not in store {store.root} (stored: {stored}); capture it or pick a stored one")
        if chunk_tokens <= 0:
            raise WorkbenchError("--chunk-tokens must be positive")
        self.store, self.hook = store, hook
        self.d_in = int(math.prod(hooks[hook]["shape"]))
        files = store.activation_files(hook)
        held = files[-1].first + files[-1].rows if files else 0
        n = held if stop is None else min(stop, held)
        if n - start <= 0:
            raise WorkbenchError(f"store {store.root} holds no tokens in [{start}, {n}); run `workbench capture` first")
        self.n_tokens = n - start
        self.ranges = [(s, min(s + chunk_tokens, n)) for s in range(start, n, chunk_tokens)]
        self.loader = HookActivationLoader(files, hooks[hook]["dtype"], self.d_in, self.ranges, device, resident)
        self.stream = ChunkedShuffleStream([b - a for a, b in self.ranges], self.loader.load, buffer_chunks, seed,
                                           prefetch=self.loader.prefetch)

    def batches(self, batch_size: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        return self.stream.batches(batch_size, start_batch)

    def describe(self) -> dict[str, Any]:
        info = self.store.manifest.get("capture", {})
        return {
            "source": "store",
            "store": str(self.store.root),
            "hook": self.hook,
            "model_name": self.store.model_name,
            "context_size": info.get("ctx"),
            "dataset_path": info.get("data"),
            "store_tokens": self.n_tokens,
            "stored_dtype": self.loader.stored_dtype,
            "resident": self.loader.resident,
        }


class LiveModelSource:
    """Activations computed on the fly: context windows [N, ctx] run through a ModelHandle.

    A chunk is `windows_per_chunk` windows; each buffer runs its chunks through the model
    (ModelHandle.run, stopping after the hooked block) and shuffles the tokens together.
    """

    def __init__(
        self, handle: Any, hook: str, windows: torch.Tensor, windows_per_chunk: int = 16, buffer_chunks: int = 8, seed: int = 0
    ) -> None:
        self.handle, self.hook, self.windows = handle, handle.resolve_hooks([hook])[0], windows
        self.windows_per_chunk = windows_per_chunk
        self.d_in = int(math.prod(handle.hook_shapes([self.hook])[self.hook]))
        n_chunks = math.ceil(len(windows) / windows_per_chunk)
        sizes = [min(windows_per_chunk, len(windows) - c * windows_per_chunk) * windows.shape[1] for c in range(n_chunks)]
        self.stream = ChunkedShuffleStream(sizes, self._load, buffer_chunks, seed)

    def _load(self, chunks: list[int]) -> torch.Tensor:
        rows = torch.cat([self.windows[c * self.windows_per_chunk : (c + 1) * self.windows_per_chunk] for c in chunks])
        acts = self.handle.run(rows, [self.hook], stop_at_layer=self.handle.stop_layer_for([self.hook]))[self.hook]
        return acts.reshape(-1, self.d_in).float().cpu()

    def batches(self, batch_size: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        return self.stream.batches(batch_size, start_batch)

    def describe(self) -> dict[str, Any]:
        return {
            "source": "live-model",
            "hook": self.hook,
            "model_name": self.handle.name,
            "context_size": int(self.windows.shape[1]),
            "windows": int(len(self.windows)),
        }


class TensorSource:
    """An in-memory [N, d_in] tensor, reshuffled every epoch (tests, benchmarks, notebooks)."""

    def __init__(self, data: torch.Tensor, seed: int = 0, name: str = "tensor") -> None:
        if data.ndim != 2 or len(data) == 0:
            raise WorkbenchError(f"training data must be a non-empty [tokens, d_in] tensor, got shape {tuple(data.shape)}")
        self.data, self.d_in, self.name = data.float(), int(data.shape[1]), name
        self.stream = ChunkedShuffleStream([len(data)], lambda _: self.data, 1, seed)

    def batches(self, batch_size: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        return self.stream.batches(batch_size, start_batch)

    def describe(self) -> dict[str, Any]:
        return {"source": self.name, "tokens": int(len(self.data))}
