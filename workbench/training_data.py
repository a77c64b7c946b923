"""Training activations from the workbench's own data: a capture store or a live model.

Both are sae.data sources ([B, d_in] batches, any start batch without replay) over
sae.data.ChunkedShuffleStream: the store's chunks are token ranges, the live model's are
groups of context windows run through the model; each buffer of chunks is shuffled together.
A store source with a target hook (a transcoder's) pairs the two hooks' rows by token:
its batches are [B, d_in + d_out], input columns then target columns.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from sae.data import ChunkedShuffleStream
from workbench.errors import WorkbenchError
from workbench.held_out import HeldOutSplit
from workbench.store.activation_loader import HookActivationLoader, fits_resident, resident_bytes

#: Windows per forward pass of a live model (CPU, CUDA): large enough to fill the device.
FORWARD_WINDOWS = {False: 32, True: 256}


def held_out_record(split: HeldOutSplit | None, why_none: str) -> dict[str, Any]:
    """describe()'s entries for the held-out split: the split, or None and why there is none."""
    if split is None:
        return {"held_out": None, "held_out_note": why_none}
    return {"held_out": split.to_dict()}


def _stored_hook(store: Any, hook: str, what: str) -> None:
    if hook not in store.hooks:
        stored = ", ".join(sorted(store.hooks)) or "none"
        raise WorkbenchError(f"{what} '{hook}' is not in store {store.root} (stored: {stored}); capture it or pick a stored one")


class StoreSource:
    """Activations of one hook from a capture store, streamed in shuffled chunks; with
    target_hook, pairs of (hook, target_hook) rows of the same tokens (a transcoder's data).

    start / stop: train on token_index in [start, stop) only; held_out: a split of the store
    (workbench.held_out) whose tokens are left out (training stops at its start) and which
    describe() records; None records that no split exists.
    device: where batches are delivered, in the stored dtype (the trainer converts there);
    resident: hold the whole range on that device (None: when it fits, both hooks together,
    see workbench.store.activation_loader)."""

    def __init__(
        self, store: Any, hook: str, chunk_tokens: int = 65536, buffer_chunks: int = 4, seed: int = 0,
        start: int = 0, stop: int | None = None, device: str | torch.device = "cpu", resident: bool | None = None,
        held_out: HeldOutSplit | None = None,
        target_hook: str | None = None,
    ) -> None:
        hooks = store.hooks
        _stored_hook(store, hook, "hook")
        if target_hook is not None:
            _stored_hook(store, target_hook, "target hook")
        if chunk_tokens <= 0:
            raise WorkbenchError("--chunk-tokens must be positive")
        self.store, self.hook, self.target_hook, self.held_out = store, hook, target_hook, held_out
        if held_out is not None:
            stop = held_out.start if stop is None else min(stop, held_out.start)
        self.d_in = int(math.prod(hooks[hook]["shape"]))
        self.d_out = int(math.prod(hooks[target_hook]["shape"])) if target_hook is not None else None
        files = store.activation_files(hook)
        held = files[-1].first + files[-1].rows if files else 0
        # a store's batch files hold every hook of its tokens (the store refuses one that does
        # not), so the two hooks' files cover the same token spans row for row
        target_files = store.activation_files(target_hook) if target_hook is not None else []
        n = held if stop is None else min(stop, held)
        if n - start <= 0:
            raise WorkbenchError(f"store {store.root} holds no tokens in [{start}, {n}); run `workbench capture` first")
        self.n_tokens = n - start
        self.ranges = [(s, min(s + chunk_tokens, n)) for s in range(start, n, chunk_tokens)]
        sizes = [b - a for a, b in self.ranges]
        if target_hook is None:
            self.loader = HookActivationLoader(files, hooks[hook]["dtype"], self.d_in, self.ranges, device, resident)
            self.stream = ChunkedShuffleStream(sizes, self.loader.load, buffer_chunks, seed, prefetch=self.loader.prefetch)
            return
        if resident is None:  # both copies together must fit
            nbytes = resident_bytes(self.n_tokens, self.d_in, hooks[hook]["dtype"])
            nbytes += resident_bytes(self.n_tokens, self.d_out, hooks[target_hook]["dtype"])
            resident = fits_resident(nbytes, HookActivationLoader.resolve_device(device))
        self.loader = HookActivationLoader(files, hooks[hook]["dtype"], self.d_in, self.ranges, device, resident)
        self.target_loader = HookActivationLoader(target_files, hooks[target_hook]["dtype"], self.d_out, self.ranges, device, resident)
        self.stream = ChunkedShuffleStream(sizes, self._load_pairs, buffer_chunks, seed, prefetch=self._prefetch_pairs)

    def _load_pairs(self, chunks: list[int]) -> torch.Tensor:
        """The chunks' input and target rows side by side, [rows, d_in + d_out]."""
        x, y = self.loader.load(chunks), self.target_loader.load(chunks)
        return torch.cat([x, y.to(x.dtype)], dim=1)

    def _prefetch_pairs(self, chunks: list[int]) -> None:
        self.loader.prefetch(chunks)
        self.target_loader.prefetch(chunks)

    def batches(self, batch_size: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        return self.stream.batches(batch_size, start_batch)

    def describe(self) -> dict[str, Any]:
        info = self.store.manifest.get("capture", {})
        return {
            "source": "store",
            "store": str(self.store.root),
            "hook": self.hook,
            **({"target_hook": self.target_hook} if self.target_hook is not None else {}),
            "model_name": self.store.model_name,
            "context_size": info.get("ctx"),
            "dataset_path": info.get("data"),
            "store_tokens": self.n_tokens,
            "stored_dtype": self.loader.stored_dtype,
            "resident": self.loader.resident,
            "train_tokens": list(self.loader.span),
            **held_out_record(self.held_out, "the source was built without a held-out split"),
        }


class LiveModelSource:
    """Activations computed on the fly: context windows [N, ctx] run through a ModelHandle.

    A chunk is `windows_per_chunk` windows; each buffer runs its chunks through the model
    (ModelHandle.run, stopping after the hooked block, `forward_windows` windows a pass) and
    shuffles the tokens together.
    """

    def __init__(
        self, handle: Any, hook: str, windows: torch.Tensor, windows_per_chunk: int = 16, buffer_chunks: int = 8, seed: int = 0,
        forward_windows: int = 32,
    ) -> None:
        self.handle, self.hook, self.windows = handle, handle.resolve_hooks([hook])[0], windows
        self.windows_per_chunk, self.forward_windows = windows_per_chunk, forward_windows
        self.d_in = int(math.prod(handle.hook_shapes([self.hook])[self.hook]))
        self.d_out = None
        n_chunks = math.ceil(len(windows) / windows_per_chunk)
        sizes = [min(windows_per_chunk, len(windows) - c * windows_per_chunk) * windows.shape[1] for c in range(n_chunks)]
        self.stream = ChunkedShuffleStream(sizes, self._load, buffer_chunks, seed)

    @torch.no_grad()
    def _load(self, chunks: list[int]) -> torch.Tensor:
        """The chunks' activations on the model's device, in its dtype (the trainer converts)."""
        rows = torch.cat([self.windows[c * self.windows_per_chunk : (c + 1) * self.windows_per_chunk] for c in chunks])
        stop = self.handle.stop_layer_for([self.hook])
        parts = [self.handle.run(rows[i : i + self.forward_windows], [self.hook], stop_at_layer=stop)[self.hook]
                 for i in range(0, len(rows), self.forward_windows)]
        return torch.cat(parts).reshape(-1, self.d_in)

    def batches(self, batch_size: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        return self.stream.batches(batch_size, start_batch)

    def describe(self) -> dict[str, Any]:
        return {
            "source": "live-model",
            "hook": self.hook,
            "model_name": self.handle.name,
            "context_size": int(self.windows.shape[1]),
            "windows": int(len(self.windows)),
            "tokens": int(self.windows.numel()),
            **held_out_record(None, "live-model training reads no store: no held-out split exists"),
        }


def live_model_source(
    model: str, data: str, hook: str, ctx: int, tokens: int, chunk_tokens: int, buffer_chunks: int, seed: int, device: str
) -> LiveModelSource:
    """`workbench train --model`: the first windows of `data` that hold `tokens` tokens (fewer
    if the data runs out, then cycled), run through `model` on `device` as training asks."""
    from workbench.capture.texts import load_corpus
    from workbench.capture.windows import iter_windows
    from workbench.models.registry import load_model

    if ctx < 2:
        raise WorkbenchError(f"--ctx {ctx} is too short: a window needs room for text")
    handle = load_model(model, device=device)
    wanted = math.ceil(tokens / ctx)
    rows = []
    for ids, _ in iter_windows(handle, load_corpus(data).documents, ctx):
        rows.append(torch.from_numpy(ids))
        if len(rows) == wanted:
            break
    if not rows:
        raise WorkbenchError(f"--data {data} holds no complete window of --ctx {ctx} tokens")
    windows = torch.stack(rows)
    return LiveModelSource(handle, hook, windows, windows_per_chunk=max(1, chunk_tokens // ctx), buffer_chunks=buffer_chunks, seed=seed,
                            forward_windows=FORWARD_WINDOWS[handle.device.type == "cuda"])
