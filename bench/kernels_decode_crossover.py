"""Where the padded sparse decode stops beating one dense product on a GPU (a device
benchmark, not a test): forward and backward of sae.kernels.sparse_decode on a [B, w] code
against the same code scattered dense and multiplied, at 768x24576 B4096, for widths w from
k-like to an eighth of d_sae. sae.model.SPARSE_DECODE_MAX_FRACTION is set from it.

    python3 bench/kernels_decode_crossover.py
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from sae.code import SparseCode
from sae.kernels import sparse_decode

B, D, F = 4096, 768, 24576


def milliseconds(fn: Callable[[], object], n: int = 10) -> float:
    """Mean wall time of fn over n calls after 2 warm-up calls, between two syncs."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / n * 1e3


def main() -> None:
    W = torch.randn(F, D, device="cuda", requires_grad=True)
    grad = torch.randn(B, D, device="cuda")
    for width in (128, 256, 512, 768, 1024, 1536, 3072):
        indices = torch.randint(0, F, (B, width), device="cuda")
        values = torch.rand(B, width, device="cuda", requires_grad=True)
        sparse = milliseconds(lambda: sparse_decode(indices, values, W).backward(grad))
        dense = milliseconds(lambda: (SparseCode(indices, values).to_dense(F) @ W).backward(grad))
        print(f"width {width} (d_sae / {F / width:.0f}): sparse {sparse:.2f} ms, dense {dense:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
