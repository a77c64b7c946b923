"""Mutual Choice's fused-step pieces on a GPU, each timed alone (a device benchmark, not a
test): sae.kernels.batch_topk_entries at 768x24576 k32 B4096 (cap 256, the rule's 8k) beside
the torch.topk of each row's cap largest it starts with, and the entries decode
(_decode_residual_entries_kernel over the code it returns, several tile shapes) beside the
fixed-width decode_residual at k = 32. The pre-activations are Gaussian with a per-row scale,
so rows differ in width as a trained SAE's do.

    python3 bench/kernels_decode_entries.py
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from sae.kernels.select import batch_topk_entries
from sae.kernels.triton_decode_residual import _decode_residual_entries_kernel, decode_residual

B, D, F, K = 4096, 768, 24576, 32
CAP = 8 * K


def milliseconds(fn: Callable[[], object], n: int = 50) -> float:
    """Mean wall time of fn over n calls after 5 warm-up calls, between two syncs."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / n * 1e3


def main() -> None:
    torch.manual_seed(0)
    z = (torch.randn(B, F, device="cuda") * (0.5 + torch.rand(B, 1, device="cuda"))).to(torch.bfloat16)
    code, _ = batch_topk_entries(z, K, cap=CAP)
    widths = code.row_ptr[1:] - code.row_ptr[:-1]
    print(f"row widths: max {int(widths.max())}, mean {float(widths.float().mean()):.1f}")
    W = torch.randn(F, D, device="cuda").to(torch.bfloat16)
    b_dec, x, scale = torch.randn(D, device="cuda"), torch.randn(B, D, device="cuda"), torch.tensor([0.1], device="cuda")
    grad_out = torch.empty(B, D, device="cuda", dtype=torch.bfloat16)
    grad_val, sq = torch.empty(code.values.numel(), device="cuda"), torch.empty(B, device="cuda")
    for block_k, warps in [(4, 4), (8, 4), (16, 4), (8, 8), (16, 8), (32, 8), (4, 2), (8, 2)]:
        def decode(block_k: int = block_k, warps: int = warps) -> None:
            _decode_residual_entries_kernel[(B,)](code.row_ptr, code.indices, code.values, W, b_dec, x, scale, grad_out,
                                                  grad_val, sq, sq, D, WRITE_RESIDUAL=False, BLOCK_K=block_k, BLOCK_D=1024,
                                                  num_warps=warps)
        print(f"entries decode BLOCK_K={block_k} warps={warps}: {milliseconds(decode):.3f} ms")
    indices, values = torch.randint(0, F, (B, K), device="cuda"), torch.rand(B, K, device="cuda")
    fixed = milliseconds(lambda: decode_residual(indices, values, W, b_dec, x, scale, grad_out_dtype=torch.bfloat16))
    print(f"fixed-width decode_residual k={K}: {fixed:.3f} ms")
    print(f"batch_topk_entries: {milliseconds(lambda: batch_topk_entries(z, K, cap=CAP)):.3f} ms")
    print(f"torch.topk of each row's {CAP}: {milliseconds(lambda: z.topk(CAP, dim=1, sorted=False)):.3f} ms")


if __name__ == "__main__":
    main()
