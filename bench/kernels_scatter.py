"""Micro-benchmark (GPU): block-size sweep of the per-feature scatter (dW_dec / dW_enc).

At the three training shapes, times sae.kernels.triton_scatter.feature_scatter (sort
included) for several (BLOCK_D, BLOCK_P, num_warps), checks each against a float64
reference first, and prints ms and the fraction of the bandwidth floor (read the B*k
gathered src rows once, write dW once).

Run: python bench/kernels_scatter.py
"""

from __future__ import annotations

import itertools

import torch
import triton.testing

from sae.kernels.triton_scatter import feature_scatter, sort_pairs_by_feature

CONFIGS = [(4096, 32, 24576, 768), (4096, 64, 65536, 2048), (8192, 64, 131072, 4096)]


def main() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}")
    print("| config | src dtype | BLOCK_D | BLOCK_P | warps | ms | fraction of floor |")
    print("|---|---|---|---|---|---|---|")
    for B, k, F, D in CONFIGS:
        idx = torch.randint(0, F, (B, k), device="cuda", generator=gen)
        coef = torch.randn(B, k, device="cuda", generator=gen)
        for dtype in (torch.float32, torch.bfloat16):
            src = torch.randn(B, D, device="cuda", generator=gen).to(dtype)
            out = torch.empty(F, D, device="cuda")
            floor_ms = (B * k * D * src.element_size() + F * D * 4) / 3.0e12 * 1e3
            small = slice(0, 256)
            ref = torch.zeros(F, D, device="cuda", dtype=torch.float64).index_add_(
                0, idx[small].reshape(-1), (coef[small].double().reshape(-1, 1) * src[small].double().repeat_interleave(k, 0)))
            for bd, bp, nw in itertools.product((256, 512, 1024), (8, 16), (4, 8)):
                chk = torch.full((F, D), float("nan"), device="cuda")
                o, off = sort_pairs_by_feature(idx[small], F)
                feature_scatter(o, off, k, coef[small].contiguous(), src[small], chk, block_d=bd, block_p=bp, num_warps=nw)
                err = ((chk.double() - ref).norm() / ref.norm()).item()
                assert err < 1e-2, (bd, bp, nw, err)

                def run():
                    order, offsets = sort_pairs_by_feature(idx, F)
                    feature_scatter(order, offsets, k, coef, src, out, block_d=bd, block_p=bp, num_warps=nw)

                ms = triton.testing.do_bench(run, warmup=10, rep=50, return_mode="median")
                print(f"| {D}x{F} k{k} B{B} | {str(dtype)[6:]} | {bd} | {bp} | {nw} | {ms:.3f} | {floor_ms / ms:.1%} |", flush=True)
            src = out = None  # the lambdas above hold them: drop them before the next block size
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
