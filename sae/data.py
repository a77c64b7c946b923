"""Where training activations come from: the stream every source shares, and a tensor.

Each source yields float batches [B, d_in] (float32, or 16-bit as stored; on the CPU or the
training device: the trainer converts) from a deterministic stream, and can start at
any batch number without replaying the ones before, which is what makes resume exact.
A transcoder's source pairs each input row with its target row: its batches are
[B, d_in + d_out], the input's columns then the target's (so one shuffle keeps the pairs
aligned), and its d_out says the target's width (None on an autoencoder's source).
ChunkedShuffleStream is that stream's shape: data is cut into chunks (e.g. token ranges of
a store, groups of context windows run through a model); each epoch visits the chunks
in a seeded random order, a few at a time (the shuffle buffer), and shuffles the tokens of
those chunks together. Memory holds one buffer, never the whole table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch

from sae.errors import SAEError


class ActivationSource(Protocol):
    d_in: int
    #: The target's width for a transcoder (rows are input then target); None: no target.
    d_out: int | None

    def batches(self, batch_size: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """[batch_size, d_in (+ d_out)] float batches of the stream, from batch number start_batch on."""
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
            raise SAEError("no activations to train on: the data source is empty")
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


class TensorSource:
    """An in-memory [N, d_in] tensor, reshuffled every epoch (tests, benchmarks, notebooks);
    with target [N, d_out], a transcoder's pairs."""

    def __init__(self, data: torch.Tensor, seed: int = 0, name: str = "tensor", target: torch.Tensor | None = None) -> None:
        if data.ndim != 2 or len(data) == 0:
            raise SAEError(f"training data must be a non-empty [tokens, d_in] tensor, got shape {tuple(data.shape)}")
        if target is not None and (target.ndim != 2 or len(target) != len(data)):
            raise SAEError(f"the target must be [tokens, d_out] with the data's {len(data)} rows, got shape {tuple(target.shape)}")
        self.d_in, self.name = int(data.shape[1]), name
        self.d_out = None if target is None else int(target.shape[1])
        self.data = data.float() if target is None else torch.cat([data.float(), target.float()], dim=1)
        self.stream = ChunkedShuffleStream([len(data)], lambda _: self.data, 1, seed)

    def batches(self, batch_size: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        return self.stream.batches(batch_size, start_batch)

    def describe(self) -> dict[str, Any]:
        return {"source": self.name, "tokens": int(len(self.data))}
