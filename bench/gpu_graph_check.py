"""The fused step's CUDA graphs on the GPU: the radix batch select, and graph replay against
the same trainer run eagerly (device GPU; exits 1 if a check fails).

1. sae.kernels.batch_topk_entries (Mutual Choice's fused selection) on bf16 z = x W_enc at
   the training shapes: its values are the batch's k*B largest, each at its own position,
   and it is captured by a CUDA graph (no host sync); milliseconds, do_bench, beside the
   row-capped selection it replaced (each row's 8k largest by torch.topk, then the k*B
   largest of those, which had to read an overflow count on the host).
2. For TopK with its default AuxK and Mutual Choice with its default aux-zipf (and without
   aux), the Trainer trains the same SAE on the same batches twice: with the step it builds
   on CUDA (sae.graph_step.CudaGraphStep around the fused step) and with the fused step
   alone, eagerly. Checks: the graph step captured graphs (a capture fails on any host sync),
   the FVU histories agree and the weights end close (the aux capacity, which follows a
   count that reaches the host a step late, can differ between the two runs and with it the
   aux products' rounding). Prints each run's tokens/s.

Run: python bench/gpu_graph_check.py [--steps 400]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import torch
import triton.testing

from sae.config import TrainConfig
from sae.data import TensorSource
from sae.graph_step import CudaGraphStep
from sae.kernels import batch_topk_entries
from sae.trainer import Trainer

SELECT_SHAPES = [(4096, 32, 24576, 768), (4096, 64, 65536, 2048)]


def check_select() -> bool:
    ok = True
    gen = torch.Generator(device="cuda").manual_seed(0)
    for B, k, d_sae, d_in in SELECT_SHAPES:
        x = torch.randn(B, d_in, device="cuda", generator=gen, dtype=torch.bfloat16)
        W = torch.randn(d_in, d_sae, device="cuda", generator=gen, dtype=torch.bfloat16) / d_in**0.5
        z = x @ W
        code = batch_topk_entries(z, k)
        want = z.float().relu().reshape(-1).topk(k * B).values
        positions = code.rows.long() * d_sae + code.indices
        exact = (torch.equal(code.values.sort().values, want.sort().values) and positions.unique().numel() == k * B
                 and torch.equal(code.values, z.float().relu().reshape(-1)[positions]))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            batch_topk_entries(z, k)
        ms = triton.testing.do_bench(lambda: batch_topk_entries(z, k), warmup=10, rep=100)
        capped = triton.testing.do_bench(lambda: z.topk(8 * k, dim=1, sorted=False)[0].float().relu().reshape(-1).topk(k * B, sorted=False),
                                         warmup=10, rep=100)
        print(f"select {d_in}x{d_sae} k{k} B{B}: batch_topk_entries {ms:.3f} ms (captured in a graph), "
              f"the row-capped cut before it {capped:.3f} ms; exact: {exact}")
        ok &= exact
    return ok


def train(arch: str, aux: str, data: torch.Tensor, steps: int, graph: bool) -> tuple[Trainer, float]:
    d_in = data.shape[1]
    config = TrainConfig(arch=arch, d_in=d_in, d_sae=24576, k=32, batch_size=4096, tokens=steps * 4096, device="cuda",
                         aux=aux, warmup_steps=0, init_tokens=4096, log_every=max(1, steps // 10), seed=0)
    trainer = Trainer.start(config, TensorSource(data), out=None, command=[])
    if not graph:
        trainer.stepper = trainer.stepper.inner
    torch.cuda.synchronize()
    started = time.perf_counter()
    trainer.fit(progress=False)
    torch.cuda.synchronize()
    return trainer, steps * 4096 / (time.perf_counter() - started)


def check_graphs(steps: int) -> bool:
    from gpu_rules import low_rank_data

    ok = True
    data = low_rank_data(16 * 4096, 768, "cuda")
    for arch in ("topk", "mutual-choice"):  # compile the kernels first, so neither timed run pays for it
        train(arch, "auxk", data, 300, graph=False)
    for arch, aux in (("topk", "auxk"), ("mutual-choice", "aux-zipf"), ("mutual-choice", "none")):
        graphed, graph_tok_s = train(arch, aux, data, steps, graph=True)
        eager, eager_tok_s = train(arch, aux, data, steps, graph=False)
        step = graphed.stepper
        captured = isinstance(step, CudaGraphStep) and len(step._graphs) > 0
        fvu_g = [h["fvu"] for h in graphed.history]
        fvu_e = [h["fvu"] for h in eager.history]
        close = all(abs(a - b) <= 0.02 * max(b, 1e-3) for a, b in zip(fvu_g, fvu_e))
        weights = max(float((p - q).norm() / q.norm()) for p, q in zip(graphed.model.state_dict().values(), eager.model.state_dict().values())
                      if p.is_floating_point() and p.dim() > 0)
        print(f"{arch}/{aux}: graph {graph_tok_s:,.0f} tok/s ({len(step._graphs) if captured else 0} graphs kept, keys "
              f"{list(step._graphs) if captured else []}), eager {eager_tok_s:,.0f} tok/s (ratio {graph_tok_s / eager_tok_s:.2f}); "
              f"FVU {fvu_g[0]:.4f} -> {fvu_g[-1]:.4f} against {fvu_e[0]:.4f} -> {fvu_e[-1]:.4f}; "
              f"largest relative weight difference {weights:.2e}")
        if arch == "mutual-choice":
            print(f"  theta {float(graphed.model.rule.theta):.4f} against {float(eager.model.rule.theta):.4f}")
            close &= abs(float(graphed.model.rule.theta) - float(eager.model.rule.theta)) <= 0.02 * float(eager.model.rule.theta)
        ok &= captured and close and fvu_g[-1] < fvu_g[0]
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    args = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()}")
    ok = check_select()
    ok &= check_graphs(args.steps)
    print("all checks passed" if ok else "A CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
