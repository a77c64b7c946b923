"""Training speed past one GPU (device GPUs; not a test): run under torchrun.

Two measurements, each a synthetic TopK step loop on the same global batches on every rank
(the data stream is not part of it):
- "fused": tokens/s of the fused TopK step at d_in x d_sae, k, global batch B. With one
  process it is sae.fused_step.FusedTopKStep replayed as a CUDA graph (the Trainer's step
  on one GPU); with N processes sae.fused_data_parallel.FusedDataParallelStep, each rank
  encoding B / N rows. Run it with --nproc_per_node 1 and then 2 and compare.
- "shard": sae.latent_shard.ShardedTopKStep at each width of --widths (features split over
  the ranks): tokens/s and each rank's peak memory; a width whose predicted memory
  (memory_per_gpu, the formula docs/scale.md gives) exceeds what the GPU has free is
  reported as not run instead of being tried (an out-of-memory error on one rank would
  leave the others waiting in a collective).
Rank 0 prints one JSON row per measurement (and writes them with --json).

    torchrun --nproc_per_node 1 bench/multi_gpu.py fused --config 2048x65536 --k 64 --batch 4096
    torchrun --nproc_per_node 2 bench/multi_gpu.py fused --config 2048x65536 --k 64 --batch 4096
    torchrun --nproc_per_node 2 bench/multi_gpu.py shard --d-in 2048 --widths 262144,524288,1048576,2097152
A check on the CPU at a tiny size (gloo; the fused step's kernels under the interpreter):
    TRITON_INTERPRET=1 torchrun --nproc_per_node 2 bench/multi_gpu.py fused --device cpu --config 12x24 --k 3 --batch 8 --steps 3 --warmup 1
    torchrun --nproc_per_node 2 bench/multi_gpu.py shard --device cpu --d-in 12 --widths 24,48 --k 3 --batch 8 --steps 3 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist

from sae.distributed import init_process_group
from sae.model import SparseAutoencoder
from sae.rules import TopKRule

GIB = 2**30


def memory_per_gpu(d_in: int, d_sae: int, batch: int, world: int, step: str) -> float:
    """Predicted bytes one GPU holds (docs/scale.md): weights + Adam + the batch's tensors.
    fused: fp32 weights (8 d_sae d_in), bf16 moments (8), bf16 weight copies (4), z of its
    B / world rows in bf16; shard: the shard's fp32 weights, gradients and Adam (32 d_sae d_in
    / world) and its z [B, d_sae / world] in fp32 with z's gradient (8 B d_sae / world)."""
    if step == "fused":
        return 20 * d_sae * d_in + 2 * (batch // world) * d_sae + 12 * batch * d_in
    return (32 * d_sae * d_in + 8 * batch * d_sae) / world + 12 * batch * d_in


def make_model(d_in: int, d_sae: int, k: int, device: str) -> SparseAutoencoder:
    """A TopK SAE with the Trainer's init (unit decoder rows, W_enc = W_dec^T), seeded alike on every rank."""
    model = SparseAutoencoder(d_in, d_sae, TopKRule(k))
    model.init_weights(torch.Generator().manual_seed(0))
    return model.to(device)


def batches(d_in: int, batch: int, device: str, pool: int = 4) -> list[torch.Tensor]:
    """Synthetic unit-scale batches, identical on every rank (the global batches)."""
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(batch, d_in, generator=gen).to(device) for _ in range(pool)]


def timed(step, data: list[torch.Tensor], steps: int, warmup: int, device: str) -> float:
    """Seconds per step over `steps` steps after `warmup` untimed ones."""
    for i in range(warmup):
        step(data[i % len(data)])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for i in range(steps):
        step(data[i % len(data)])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dist.barrier()
    return (time.perf_counter() - start) / steps


def fused_row(args: argparse.Namespace, world: int, device: str) -> dict:
    from sae.fused_data_parallel import FusedDataParallelStep
    from sae.fused_step import FusedTopKStep
    from sae.graph_step import CudaGraphStep

    d_in, d_sae = (int(n) for n in args.config.split("x"))
    model = make_model(d_in, d_sae, args.k, device)
    model.make_encoder_feature_major()
    on_cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if on_cuda else torch.float32
    options = dict(precision="bf16" if on_cuda else "fp32", grad_out_dtype=dtype, moments_dtype=dtype, backend="triton")
    if world > 1:
        step = FusedDataParallelStep(model, 1e-4, args.batch, **options)
    else:
        inner = FusedTopKStep(model, lr=1e-4, **options)
        step = CudaGraphStep(inner) if on_cuda else inner
    seconds = timed(step, batches(d_in, args.batch, device), args.steps, args.warmup, device)
    return {"measure": "fused", "processes": world, "d_in": d_in, "d_sae": d_sae, "k": args.k, "batch": args.batch,
            "step": step.kind, "tokens_per_s": args.batch / seconds, "peak_gib": peak(device),
            "predicted_gib": memory_per_gpu(d_in, d_sae, args.batch, world, "fused") / GIB}


def shard_rows(args: argparse.Namespace, world: int, device: str) -> list[dict]:
    from sae.latent_shard import ShardedTopKStep

    rows = []
    for d_sae in (int(w) for w in args.widths.split(",")):
        predicted = memory_per_gpu(args.d_in, d_sae, args.batch, world, "shard")
        row = {"measure": "shard", "processes": world, "d_in": args.d_in, "d_sae": d_sae, "k": args.k, "batch": args.batch,
               "predicted_gib": predicted / GIB}
        free = torch.tensor([torch.cuda.mem_get_info()[0] if device.startswith("cuda") else float("inf")], device=device)
        dist.all_reduce(free, op=dist.ReduceOp.MIN)  # every rank decides alike
        if predicted > 0.9 * float(free):
            rows.append({**row, "run": False, "free_gib": float(free) / GIB})
            continue
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        host = make_model(args.d_in, d_sae, args.k, "cpu")  # the full SAE stays in host memory, as in the Trainer
        step = ShardedTopKStep(host, 1e-4, device, autocast_dtype=torch.bfloat16 if device.startswith("cuda") else None)
        seconds = timed(step, batches(args.d_in, args.batch, device), args.steps, args.warmup, device)
        rows.append({**row, "run": True, "tokens_per_s": args.batch / seconds, "peak_gib": peak(device)})
        del step, host
    return rows


def peak(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / GIB if device.startswith("cuda") else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("measure", choices=("fused", "shard"))
    parser.add_argument("--device", default="cuda", help="cuda (each rank on cuda:LOCAL_RANK) or cpu")
    parser.add_argument("--config", default="2048x65536", help="fused: d_in x d_sae")
    parser.add_argument("--d-in", type=int, default=2048, help="shard: d_in")
    parser.add_argument("--widths", default="262144,524288,1048576,2097152", help="shard: the d_sae values, comma-separated")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4096, help="the global batch (tokens a step)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--json", default=None, help="also write the rows to this file (rank 0)")
    args = parser.parse_args()
    rank, world, local_rank = init_process_group()
    device = args.device
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    try:
        rows = [fused_row(args, world, device)] if args.measure == "fused" else shard_rows(args, world, device)
        if rank == 0:
            for row in rows:
                print(json.dumps(row))
            if args.json:
                with open(args.json, "w") as handle:
                    json.dump(rows, handle, indent=1)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
