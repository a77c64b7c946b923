"""Where one fused TopK training step spends its GPU time (device GPU; not a test).

Builds bench/gpu_train.py's fused step with the trainer's settings (--pair-chunk to change
its chunks) at each config, trains it --train-steps steps (so its features fire as a trained
SAE's do: a few on a third of the batch), runs a few steps under torch.profiler and prints the kernels by total CUDA time, the pairs per
feature (the per-feature kernel's load balance), then the host time to issue one step
against the step's time synced (a host-bound step issues slower
than the GPU runs it).

Run: python bench/gpu_profile.py [--configs 0,1,2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from gpu_train import CONFIGS, TRAINER_SETTINGS, OursFusedStep, synthetic_pool  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="0,1,2")
    ap.add_argument("--rows", type=int, default=18)
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--pair-chunk", type=int, default=None, help="FusedTopKStep's pair_chunk (default: its own)")
    args = ap.parse_args()
    for ci in (int(c) for c in args.configs.split(",")):
        d_in, d_sae, k, B = CONFIGS[ci]
        print(f"\n=== {d_in}x{d_sae} k{k} B{B}", flush=True)
        pool = synthetic_pool(d_in, k, B, 8, seed=ci)
        chunk = {} if args.pair_chunk is None else {"pair_chunk": args.pair_chunk}
        method = OursFusedStep(d_in, d_sae, k, pool[0], graph=False, **TRAINER_SETTINGS, **chunk)
        for i in range(args.train_steps):
            method.step(pool[i % 8])
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(5):
                method.step(pool[i % 2])
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70), flush=True)
        host, synced = [], []
        for i in range(20):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            method.step(pool[i % 2])
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            host.append(t1 - t0)
            synced.append(time.perf_counter() - t0)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            counts = torch.bincount(method.model(pool[0])[1].indices.reshape(-1), minlength=d_sae)
        print(f"pairs per feature after {args.train_steps + 5 + 20} steps: max {int(counts.max())}, mean {counts.float().mean():.1f}, "
              f"features with none {int((counts == 0).sum())}, pairs in features over 64 pairs {int(counts[counts > 64].sum())}")
        print(f"host issue {statistics.median(host) * 1e3:.3f} ms, step synced {statistics.median(synced) * 1e3:.3f} ms (medians of 20)")
        del method, pool
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
