"""Short hashes of a model's weights, so a store can tell that a different model is being captured into it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

FINGERPRINT_CHARS = 16


def fingerprint_files(paths: list[Path]) -> str:
    """sha256 over the bytes of the weight files, taken in name order (16 hex characters)."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()[:FINGERPRINT_CHARS]


def fingerprint_state_dict(state: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order, for models with no weight files at hand."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:FINGERPRINT_CHARS]
