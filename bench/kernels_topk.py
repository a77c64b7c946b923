"""Micro-benchmark (GPU): per-row top-k on bf16 pre-activations, torch.topk against the
Triton bisection select (sae.kernels.triton_topk): the full chunked bisection and the split
guess and verify (guess, segment filter over many programs, select from the candidates)
at several segment widths, warps and margins. Rows are normal with a random scale per row (0.25-3.25),
as activations' norms vary per token. Each variant's kept values are checked against
torch.topk first.

Run: python bench/kernels_topk.py
"""

from __future__ import annotations

import itertools

import torch
import triton.testing

from sae.kernels.triton_topk import row_topk

CONFIGS = [(4096, 32, 24576), (4096, 64, 65536), (8192, 64, 131072)]


def main() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}")
    print("| rows x cols, k | variant | ms |")
    print("|---|---|---|")
    for B, k, N in CONFIGS:
        z = torch.randn(B, N, device="cuda", generator=gen).to(torch.bfloat16)
        # rows of different scale, as in training (activations' norms vary per token)
        z = (z.float() * torch.rand(B, 1, device="cuda", generator=gen).mul(3).add(0.25)).to(torch.bfloat16)
        ref = z.topk(k, dim=1).values.float().relu().sort(1).values
        variants = {"torch.topk": lambda: z.topk(k, dim=1, sorted=False)}
        variants["bisect, chunk 1024, 4 warps"] = lambda: row_topk(z, k, method="stream", chunk=1024, num_warps=4)
        for over, seg, warps in itertools.product((3, 4), (1024, 2048, 4096), (4, 8)):
            variants[f"split, oversample {over}, segment {seg}, {warps} warps"] = (
                lambda o=over, s=seg, w=warps: row_topk(z, k, method="split", segment=s, num_warps=w, oversample=o))
        for name, fn in variants.items():
            if name != "torch.topk":
                vals = fn()[0].sort(1).values
                assert torch.equal(vals, ref), name
            ms = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
            print(f"| {B}x{N}, k{k} | {name} | {ms:.3f} |", flush=True)
        z = None  # the lambdas above hold it: drop it before the next shape
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
