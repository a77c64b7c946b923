"""Where one of our training steps spends its GPU time (device GPU; not a test).

Builds the "ours (triton, no graph)" method of bench/gpu_train.py at each config, runs a
few steps under torch.profiler and prints the kernels by total CUDA time; also times the
fused row top-k against torch.topk on the same bf16 pre-activations.

Run: python bench/gpu_profile.py [--configs 0,1,2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton.testing
from torch.profiler import ProfilerActivity, profile

from sae.kernels.triton_topk import MAX_ROW, row_topk

sys.path.insert(0, str(Path(__file__).parent))
from gpu_train import CONFIGS, Ours, synthetic_pool  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="0,1,2")
    ap.add_argument("--rows", type=int, default=18)
    args = ap.parse_args()
    for ci in (int(c) for c in args.configs.split(",")):
        d_in, d_sae, k, B = CONFIGS[ci]
        print(f"\n=== {d_in}x{d_sae} k{k} B{B}", flush=True)
        z = torch.randn(B, d_sae, device="cuda", dtype=torch.bfloat16)
        t_torch = triton.testing.do_bench(lambda: z.topk(k, dim=1, sorted=False), warmup=25, rep=100, return_mode="median")
        line = f"torch.topk bf16: {t_torch:.3f} ms"
        if d_sae <= MAX_ROW:
            t_ours = triton.testing.do_bench(lambda: row_topk(z, k), warmup=25, rep=100, return_mode="median")
            line += f"; row_topk (triton): {t_ours:.3f} ms"
        print(line, flush=True)
        del z
        pool = synthetic_pool(d_in, k, B, 2, seed=ci)
        method = Ours(d_in, d_sae, k, pool[0], triton_path=True, feature_major=True, graph=False, bf16=True)
        for _ in range(3):
            method.step(pool[0])
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(5):
                method.step(pool[i % 2])
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70), flush=True)
        del method, pool
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
