"""The capture loop: documents -> windows -> batches -> model forward -> store batches.

Resumable by construction: windows are deterministic, a batch is stored whole or not at
all, and a rerun of the same command skips the batches already on disk. Exactly `tokens`
rows end up in the store (the last batch is cut to fit) unless the data runs out first.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from workbench.capture.batch_tables import HostCopy, PendingBatch, TokenVocabulary
from workbench.capture.probe import BatchContext, Probe
from workbench.capture.ranks import CaptureRanks
from workbench.capture.texts import load_corpus
from workbench.capture.windows import iter_batches, iter_windows
from workbench.errors import WorkbenchError
from workbench.models.device import check_device
from workbench.models.handle import ModelHandle
from workbench.store.crash import crash_point
from workbench.store.encoding import STORAGE_DTYPES
from workbench.store.layout import (
    FORMAT_VERSION,
    TOKENS_TABLE,
    WRITE_TEST_PREFIX,
    committed_batches,
    holds_only_leftovers,
    read_manifest,
    write_manifest,
)
from workbench.store.writer import BatchWriter, remove_partial_batches

WRITER_THREADS_ON_ACCELERATOR = 6


#: `--dtype auto`: the stored precision follows the model's (see storage_dtype_for).
AUTO_DTYPE = "auto"

@dataclass
class CaptureSettings:
    """What a capture asks for; a resumed capture must ask for exactly the same."""

    model: str
    data: str
    hooks: list[str]
    tokens: int
    ctx: int = 128
    batch_size: int = 32
    store: str = "stores/default"
    dtype: str = "auto"
    probes: list[str] = field(default_factory=list)
    device: str = "cpu"


@dataclass
class CaptureReport:
    store: Path
    tokens: int
    new_tokens: int
    resumed_batches: int
    seconds: float
    exhausted: bool


def storage_dtype_for(handle: ModelHandle) -> str:
    """`--dtype auto`: a model that computes in bfloat16 (or float16) is stored at 2 bytes a
    value, losing nothing it had; a float32 model's activations are stored as float32."""
    compute = next(handle.model.parameters()).dtype
    return {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(compute, "float32")


def check_settings(settings: CaptureSettings) -> None:
    """Reject impossible settings before anything is loaded or written."""
    if settings.tokens <= 0:
        raise WorkbenchError(f"--tokens must be positive (got {settings.tokens})")
    if settings.ctx <= 1:
        raise WorkbenchError(f"--ctx must be at least 2 (got {settings.ctx})")
    if settings.batch_size <= 0:
        raise WorkbenchError(f"--batch-size must be positive (got {settings.batch_size})")
    if settings.dtype not in (AUTO_DTYPE, *STORAGE_DTYPES):
        raise WorkbenchError(f"--dtype must be one of {AUTO_DTYPE}, {', '.join(STORAGE_DTYPES)} (got {settings.dtype})")
    if not settings.hooks and not settings.probes:
        raise WorkbenchError("nothing to capture: give --hooks and/or --probes")
    check_device(settings.device)


def check_model_fits(settings: CaptureSettings, handle: ModelHandle) -> None:
    """Reject settings the loaded model cannot run, before the store's manifest is written."""
    if handle.n_ctx is not None and settings.ctx > handle.n_ctx:
        raise WorkbenchError(
            f"--ctx {settings.ctx} is longer than the context of model {handle.name} ({handle.n_ctx} tokens, "
            f"special tokens included): use --ctx {handle.n_ctx} or less"
        )


def prepare_store_folder(path: Path) -> None:
    """Create the store folder, or say in one line why it cannot be written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        crash_point("store-folder")
        probe = path / f"{WRITE_TEST_PREFIX}{os.getpid()}"
        probe.write_bytes(b"")
        crash_point("write-test")
        probe.unlink()
    except OSError as err:
        raise WorkbenchError(f"cannot write store at {path}: {err.strerror or err}") from err


def _manifest_for(settings: CaptureSettings, handle: ModelHandle, shapes: dict[str, tuple[int, ...]], corpus_fp: str) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "model": {
            "name": handle.name,
            "fingerprint": handle.fingerprint,
            "kind": handle.kind,
            "n_layers": handle.n_layers,
            "d_model": handle.d_model,
            "prefix_ids": handle.prefix_ids,
            "suffix_ids": handle.suffix_ids,
        },
        "hooks": {h: {"shape": list(shapes[h]), "dtype": settings.dtype} for h in settings.hooks},
        "capture": {
            "data": settings.data,
            "data_fingerprint": corpus_fp,
            "tokens": settings.tokens,
            "ctx": settings.ctx,
            "batch_size": settings.batch_size,
            "probes": settings.probes,
            "complete": False,
        },
    }


def _check_compatible(root: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    """A store holds one model and one capture; anything else gets one line and no write."""
    if old["model"]["name"] != new["model"]["name"] or old["model"]["fingerprint"] != new["model"]["fingerprint"]:
        raise WorkbenchError(
            f"store {root} holds captures of model {old['model']['name']} "
            f"(weights {old['model']['fingerprint']}), not {new['model']['name']} "
            f"(weights {new['model']['fingerprint']}): use another --store"
        )
    for hook, meta in new["hooks"].items():
        stored = old["hooks"].get(hook)
        if stored is not None and stored["shape"] != meta["shape"]:
            raise WorkbenchError(
                f"store {root} holds {hook} with width {stored['shape']}, this model gives {meta['shape']}: use another --store"
            )
    differing = [
        key for key in ("data", "data_fingerprint", "tokens", "ctx", "batch_size", "probes") if old["capture"].get(key) != new["capture"].get(key)
    ]
    if set(old["hooks"]) != set(new["hooks"]):
        differing.append("hooks")
    if any(old["hooks"][h]["dtype"] != new["hooks"][h]["dtype"] for h in new["hooks"] if h in old["hooks"]):
        differing.append("dtype")
    if differing:
        was = {k: old["capture"].get(k) for k in differing if k in old["capture"]}
        if "hooks" in differing:
            was["hooks"] = sorted(old["hooks"])
        raise WorkbenchError(
            f"store {root} was captured with other settings ({', '.join(differing)}: {was}); "
            "rerun with the same settings to resume, or use another --store"
        )


def _take_store(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The store's manifest: the one it holds (which must match this capture's) or, for a
    new store, this capture's, written; then what killed writers left is cleared."""
    old = read_manifest(root)
    if old is not None:
        _check_compatible(root, old, manifest)
        manifest = old
    elif not holds_only_leftovers(root):
        raise WorkbenchError(f"{root} is not empty and is not a workbench store: use an empty or new folder")
    else:
        write_manifest(root, manifest)
    remove_partial_batches(root)
    return manifest


def _joined_store(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest rank 0 took (_take_store), as a rank beside it sees it."""
    old = read_manifest(root)
    if old is None:
        raise WorkbenchError(f"rank 0 did not open store {root} (its error says why)")
    _check_compatible(root, old, manifest)
    return old


def run_capture(settings: CaptureSettings, handle: ModelHandle | None = None, progress: bool = True,
                ranks: CaptureRanks = CaptureRanks()) -> CaptureReport:
    """Capture `settings.tokens` tokens into the store, resuming whatever is already there.
    ranks: this process's share under torchrun (workbench.capture.ranks: every rank runs
    this with the same settings; the report counts all ranks' tokens)."""
    check_settings(settings)
    corpus = load_corpus(settings.data)
    settings.data = corpus.spec
    root = Path(settings.store).expanduser()
    created = not root.exists()
    prepare_store_folder(root)
    try:
        if handle is None:
            from workbench.models.registry import load_model

            handle = load_model(settings.model, device=settings.device)
        check_model_fits(settings, handle)
        settings.hooks = handle.resolve_hooks(settings.hooks)
        if settings.dtype == AUTO_DTYPE:
            settings.dtype = storage_dtype_for(handle)
        probes: list[Probe] = []
        if settings.probes:
            from workbench.capture.probes.registry import make_probes

            probes = make_probes(settings.probes, handle)
            settings.probes = [p.name for p in probes]
        shapes = handle.hook_shapes(settings.hooks) if settings.hooks else {}
    except BaseException:
        if created:  # a refused command leaves no folder behind (rmdir: only if still empty)
            with contextlib.suppress(OSError):
                root.rmdir()
        raise

    manifest = _manifest_for(settings, handle, shapes, corpus.fingerprint)
    if ranks.rank == 0:
        try:
            manifest = _take_store(root, manifest)
        finally:
            ranks.barrier()  # the other ranks start once the store is ready, or see why not
    else:
        ranks.barrier()
        manifest = _joined_store(root, manifest)
    done = {int(p.name.removeprefix("batch-")): p for p in committed_batches(root)}
    stored_tokens = sum(_rows(p) for p in done.values())

    ctx, batch_size = settings.ctx, settings.batch_size
    n_windows = math.ceil(settings.tokens / ctx)
    n_batches = math.ceil(n_windows / batch_size)
    forward_hooks = list(dict.fromkeys(settings.hooks + [h for p in probes for h in p.hook_names(handle)]))
    stop_at = handle.stop_layer_for(forward_hooks)
    vocabulary = TokenVocabulary(handle)
    # On a GPU the host is idle while the model runs, so several threads encode and write.
    writer = BatchWriter(root, threads=1 if handle.device.type == "cpu" else WRITER_THREADS_ON_ACCELERATOR)
    started = time.perf_counter()
    new_tokens = 0
    bar = tqdm(total=settings.tokens, initial=stored_tokens, unit="tok", unit_scale=True, desc="capture",
               disable=not progress or ranks.rank != 0)
    skip = set(done) | {n for n in range(n_batches) if not ranks.owns(n)}
    try:
        with ExitStack() as stack:
            for probe in probes:
                stack.enter_context(probe.attach(handle))
            batches = iter_batches(iter_windows(handle, corpus.documents, ctx), batch_size, skip=skip, last=n_batches - 1)
            for number, ids, docs in batches:
                token_index = number * batch_size * ctx + torch.arange(ids.numel()).view(ids.shape)
                keep = token_index < settings.tokens
                cache = handle.run(ids, forward_hooks, stop_at_layer=stop_at)
                batch_ctx = BatchContext(tokens=ids.to(handle.device), token_index=token_index.to(handle.device),
                                         keep=keep.to(handle.device), batch=number)
                pending = PendingBatch(
                    ids=ids, docs=docs, token_index=token_index, keep=keep,
                    activations=HostCopy.start({hook: cache[hook] for hook in settings.hooks}),
                    probe_tables={name: table for probe in probes for name, table in probe.reduce(batch_ctx, cache).items()},
                )  # fmt: skip
                writer.submit(number, partial(pending.tables, vocabulary, ctx, settings.dtype))
                kept = int(keep.sum())
                new_tokens += kept
                bar.update(kept)
    finally:
        bar.close()
        writer.close()
    new_tokens = ranks.total(new_tokens)  # every rank's batches are on disk past this
    exhausted = stored_tokens + new_tokens < settings.tokens
    if not exhausted and ranks.rank == 0:
        manifest["capture"]["complete"] = True
        write_manifest(root, manifest)
    return CaptureReport(
        store=root,
        tokens=stored_tokens + new_tokens,
        new_tokens=new_tokens,
        resumed_batches=len(done),
        seconds=time.perf_counter() - started,
        exhausted=exhausted,
    )


def _rows(batch_folder: Path) -> int:
    return pq.ParquetFile(batch_folder / f"{TOKENS_TABLE}.parquet").metadata.num_rows
