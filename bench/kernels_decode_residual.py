"""Micro-benchmark (GPU): sae.kernels.triton_decode_residual's gather (x_hat, grad_out,
grad_val, sq_err for a batch of k-sparse codes) over float32 and bfloat16 decoder rows, at
several tile widths and warp counts, on uniform random indices at the three training shapes.
What picked decode_residual's defaults (tiles of 8 KiB of weights, 2 warps).

Run: python bench/kernels_decode_residual.py [--configs 0,1,2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.testing

from sae.kernels.triton_decode_residual import _decode_residual_kernel, decode_residual

sys.path.insert(0, str(Path(__file__).parent))
from gpu_train import CONFIGS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="0,1,2")
    args = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()}")
    print("| shape | rows | BLOCK_D | warps | us |")
    print("|---|---|---|---|---|")
    for d_in, d_sae, k, B in (CONFIGS[int(c)] for c in args.configs.split(",")):
        gen = torch.Generator(device="cuda").manual_seed(0)
        idx = torch.randint(0, d_sae, (B, k), device="cuda", generator=gen)
        val = torch.rand(B, k, device="cuda", generator=gen)
        W = torch.randn(d_sae, d_in, device="cuda", generator=gen)
        b_dec, x, scale = torch.zeros(d_in, device="cuda"), torch.randn(B, d_in, device="cuda", generator=gen), torch.ones(1, device="cuda")
        go = torch.empty(B, d_in, device="cuda", dtype=torch.bfloat16)
        gv, sq = torch.empty(B, k, device="cuda"), torch.empty(B, device="cuda")
        block_k = triton.next_power_of_2(k)
        for name, w in (("float32", W), ("bfloat16", W.to(torch.bfloat16))):
            variants = {(bd, nw): None for bd in (32, 64, 128, 256, 512) for nw in (2, 4, 8)}
            for bd, nw in variants:
                fn = lambda: _decode_residual_kernel[(B,)](idx, val, w, b_dec, x, scale, go, gv, sq, sq, k, d_in,
                                                           WRITE_RESIDUAL=False, BLOCK_K=block_k, BLOCK_D=bd, num_warps=nw)
                us = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3
                print(f"| {d_in}x{d_sae} k{k} B{B} | {name} | {bd} | {nw} | {us:.1f} |", flush=True)
            fn = lambda: decode_residual(idx, val, w, b_dec, x, scale, grad_out_dtype=torch.bfloat16)
            us = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3
            print(f"| {d_in}x{d_sae} k{k} B{B} | {name} | default | default | {us:.1f} |", flush=True)
        W = w = None  # the lambdas above hold them: drop them before the next shape
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
