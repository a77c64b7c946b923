"""GPU training speed: our TopK training step against SAELens TopK / BatchTopK and
EleutherAI sparsify TopK, side by side in one process (device GPU; not a test).

For each config (d_in x d_sae, k, batch) every method trains from its own init on the
same synthetic batches (generated on the GPU, identical for all), with Adam(fused=True)
at the same learning rate. Reported per method: tokens/s over the timed steps (CUDA
events; the first WARMUP steps excluded), the fraction of the encoder-matmul floor
(the time of the bf16 product x @ W_enc alone), peak GPU memory above the shared data,
and FVU on a held-out batch after the same number of tokens.

Our methods use the project's SparseAutoencoder (sae.model) parameters.
- "ours (fused step, graph / no graph)": sae.fused_step.FusedTopKStep, the step as kernels
  with no autograd (split row top-k, decode + loss gradient in one gather,
  per-feature backward with Adam, renorm and the bf16 encoder copy fused), one CUDA graph.
The other "ours" rows train through sae.autograd_step.AutogradStep (the Trainer's autograd
step: forward, FVU loss, backward, the decoder gradient's parallel part removed, fused
Adam, decoder renorm): on the triton backend sparse_encode (bf16 product, the rule's row
top-k, sparse encoder backward) and sparse_decode (gather-sum; per-feature backward).
- "ours (triton, graph)": W_enc stored feature-major, bf16 autocast, the whole step
  replayed by sae.graph_step.CudaGraphStep (Adam capturable).
- "ours (triton, no graph)" / "ours (triton, row-major W_enc, graph)": the same without
  the graph / with the SAELens weight layout, to show what each choice is worth.
- "ours (torch)": the torch backend (a dense autograd encoder, torch's gather decode) in
  fp32, no autocast: the FVU reference (goal: triton FVU within 1% of it).
Peers run as their libraries train: SAELens training_forward_pass (MSE + its aux loss
term; no dead mask is passed, the trainer's dead tracking is not part of the step) under
bf16 autocast; sparsify SparseCoder.forward (its own bf16 autocast, fused encoder, Triton
decoder) with its decoder renorm and parallel-gradient removal.

Run on the device. The peers travel as wheels (the device has no registry): in the repo
root, `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform
manylinux_2_28_x86_64 ... -d .whl` for sae-lens==6.54.12 eai-sparsify==1.3.3 and what the
device lacks (datasets dill multiprocess simple-parsing docstring-parser better-abc
transformer-lens fancy-einsum beartype typeguard natsort schedulefree wandb click
platformdirs pydantic pydantic-core annotated-types typing-inspection protobuf cwevals
googleapis-common-protos opentelemetry-{api,sdk,proto,semantic-conventions,
exporter-otlp-proto-http,exporter-otlp-proto-common,exporter-otlp-common,
exporter-http-transport}); then, carrying .whl:
    pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:. python bench/gpu_train.py [--configs 0,1,2] [--only PREFIXES] [--json out.json]
The "project Trainer" row also needs duckdb (workbench imports it); .whl plus duckdb is
over the 64 MiB a call may carry, so run that row in a separate call, without the peers.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from typing import Callable

import torch
import triton.testing

from sae.model import SparseAutoencoder
from sae.rules import TopKRule

CONFIGS = [(768, 24576, 32, 4096), (2048, 65536, 64, 4096), (4096, 131072, 64, 8192)]
N_POOL = 8
WARMUP = 10
LR = 4e-4


def synthetic_pool(d_in: int, k: int, B: int, n_batches: int, seed: int, device: str = "cuda") -> list[torch.Tensor]:
    """Batches of x = sum of k/2 ground-truth unit directions per token (Zipf-frequent,
    exponential magnitudes) + small noise; n_gt = 8 d_in directions. Same for every method."""
    gen = torch.Generator(device=device).manual_seed(seed)
    n_gt = 8 * d_in
    V = torch.randn(n_gt, d_in, device=device, generator=gen)
    V /= V.norm(dim=1, keepdim=True)
    freq = 1.0 / torch.arange(1, n_gt + 1, device=device, dtype=torch.float32) ** 0.7
    per_token = max(k // 2, 1)
    out = []
    for _ in range(n_batches):
        idx = torch.multinomial(freq, B * per_token, replacement=True, generator=gen).view(B, per_token)
        mag = torch.empty(B, per_token, device=device).exponential_(generator=gen)
        x = torch.nn.functional.embedding_bag(idx, V, per_sample_weights=mag, mode="sum")
        x += 0.05 * torch.randn(B, d_in, device=device, generator=gen)
        out.append(x.contiguous())
    return out


BF16 = torch.bfloat16
TRAINER_SETTINGS = dict(grad_out_dtype=BF16, moments_dtype=BF16)  # the fused step's in the Trainer under --precision bf16
FUSED_VARIANTS = {  # FusedTopKStep's settings, each a row (names: prefixes for --only)
    "ours (fused step, graph)": dict(graph=True, **TRAINER_SETTINGS),
    "ours (fused step, no pair chunks, graph)": dict(graph=True, **TRAINER_SETTINGS, pair_chunk=0),
    "ours (fused step, pair chunks of 64, graph)": dict(graph=True, **TRAINER_SETTINGS, pair_chunk=64),
    "ours (fused step, all fp32 but the encoder product, graph)": dict(graph=True),
    "ours (fused step, no graph)": dict(graph=False, **TRAINER_SETTINGS),
}


def fvu_of(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float((x - x_hat.float()).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


class Method:
    """A trainable SAE: step(x) does one full optimiser step; reconstruct(x) for eval."""

    name = ""

    def step(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Ours(Method):
    """The project's SparseAutoencoder trained through sae.autograd_step.AutogradStep (the
    model's forward: sparse_encode with the rule's selection on the triton backend),
    optionally replayed by sae.graph_step.CudaGraphStep."""

    def __init__(self, d_in, d_sae, k, x0, *, backend: str, feature_major: bool, graph: bool, bf16: bool):
        from sae.autograd_step import AutogradStep
        from sae.graph_step import CudaGraphStep

        self.name = f"ours ({backend}" + ("" if feature_major else ", row-major W_enc") + (
            ", graph" if graph else (", no graph" if backend == "triton" else "")) + ")"
        model = SparseAutoencoder(d_in, d_sae, TopKRule(k))
        model.init_weights(torch.Generator().manual_seed(0), b_dec=x0.mean(0).cpu())
        model = model.cuda()
        model.backend = backend
        if feature_major:
            model.make_encoder_feature_major()
        self.model, self.bf16 = model, bf16
        step = AutogradStep(model, LR, autocast_dtype=BF16 if bf16 else None, capturable=graph)
        self.train_step = CudaGraphStep(step) if graph else step

    def step(self, x):
        self.train_step(x)

    @torch.no_grad()
    def reconstruct(self, x):
        with torch.autocast("cuda", dtype=BF16, enabled=self.bf16, cache_enabled=False):
            return self.model(x)[0]


class OursFusedStep(Method):
    """sae.fused_step.FusedTopKStep: the TopK step as a few kernels and no autograd, with a
    graph through sae.graph_step.CudaGraphStep. step_kwargs go to FusedTopKStep (the
    variants' settings)."""

    def __init__(self, d_in, d_sae, k, x0, *, graph: bool, name: str = "ours (fused step)", **step_kwargs):
        from sae.fused_step import FusedTopKStep
        from sae.graph_step import CudaGraphStep

        self.name = name
        model = SparseAutoencoder(d_in, d_sae, TopKRule(k))
        model.init_weights(torch.Generator().manual_seed(0), b_dec=x0.mean(0).cpu())
        self.model = model.cuda()
        self.model.make_encoder_feature_major()
        self.fused = FusedTopKStep(self.model, lr=LR, **step_kwargs)
        self.train_step = CudaGraphStep(self.fused) if graph else self.fused

    def step(self, x):
        self.train_step(x)

    @torch.no_grad()
    def reconstruct(self, x):
        with torch.autocast("cuda", dtype=torch.bfloat16):  # the bf16 product, as for "ours" above
            return self.model(x)[0]


class ProjectTrainer(Method):
    """The project's own sae.trainer.Trainer.train_step with the autograd step (TopK, aux
    none, constant lr), host syncs for its metrics and NaN guard included."""

    name = "ours (project Trainer.train_step)"

    def __init__(self, d_in, d_sae, k, x0):
        from sae.config import TrainConfig
        from sae.data import TensorSource
        from sae.trainer import Trainer

        config = TrainConfig(arch="topk", d_in=d_in, d_sae=d_sae, k=k, tokens=10**9, batch_size=len(x0), lr=LR,
                             device="cuda", aux="none", warmup_steps=0, decay_fraction=0.0, init_tokens=len(x0))
        self.trainer = Trainer(config, TensorSource(x0.cpu()), None, [], step="autograd")
        self.trainer._initialise()

    def step(self, x):
        self.trainer.train_step(x)

    @torch.no_grad()
    def reconstruct(self, x):
        return self.trainer.model(x * self.trainer.input_scale)[0] / self.trainer.input_scale


class SaeLens(Method):
    def __init__(self, d_in, d_sae, k, x0, *, batch: bool):
        from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.saes.sae import TrainStepInput

        self.TrainStepInput = TrainStepInput
        cls, cfg = (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig) if batch else (TopKTrainingSAE, TopKTrainingSAEConfig)
        self.name = "SAELens " + ("BatchTopK" if batch else "TopK")
        self.sae = cls(cfg(d_in=d_in, d_sae=d_sae, k=k, device="cuda"))
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=LR, fused=True)
        self.n = 0

    def _out(self, x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return self.sae.training_forward_pass(
                self.TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=self.n, is_logging_step=False)
            )

    def step(self, x):
        self.opt.zero_grad(set_to_none=True)
        self._out(x).loss.backward()
        self.opt.step()
        self.n += 1

    @torch.no_grad()
    def reconstruct(self, x):
        return self._out(x).sae_out


class Sparsify(Method):
    name = "sparsify TopK"

    def __init__(self, d_in, d_sae, k, x0):
        from sparsify import SparseCoder, SparseCoderConfig

        self.sae = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=k), device="cuda", dtype=torch.float32)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=LR, fused=True)

    def step(self, x):
        self.opt.zero_grad(set_to_none=True)
        out = self.sae(x)
        out.fvu.backward()
        self.sae.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.sae.set_decoder_norm_to_unit_norm()

    @torch.no_grad()
    def reconstruct(self, x):
        return self.sae(x).sae_out


def encoder_floor_ms(d_in: int, d_sae: int, B: int) -> float:
    x = torch.randn(B, d_in, device="cuda", dtype=torch.bfloat16)
    W = torch.randn(d_in, d_sae, device="cuda", dtype=torch.bfloat16)
    return triton.testing.do_bench(lambda: x @ W, warmup=25, rep=100, return_mode="median")


def run_method(make: Callable[[], Method], pool, x_eval, steps: int) -> dict:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t_build = time.perf_counter()
    method = make()
    for i in range(WARMUP):
        method.step(pool[i % len(pool)])
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t_build
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(WARMUP, steps):
        method.step(pool[i % len(pool)])
    end.record()
    torch.cuda.synchronize()
    ms_per_step = start.elapsed_time(end) / (steps - WARMUP)
    peak = torch.cuda.max_memory_allocated() - base
    fvu = fvu_of(x_eval, method.reconstruct(x_eval))
    row = dict(method=method.name, ms_per_step=ms_per_step, tok_per_s=pool[0].shape[0] / ms_per_step * 1e3,
               peak_gib=peak / 2**30, fvu=fvu, build_and_warmup_s=build_s)
    del method
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="0,1,2")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--steps-large", type=int, default=80, help="steps at the 4096 x 131072 config")
    ap.add_argument("--only", default="", help="comma-separated name prefixes to run (default all)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    results = []
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    for ci in (int(c) for c in args.configs.split(",")):
        d_in, d_sae, k, B = CONFIGS[ci]
        steps = args.steps_large if ci == 2 else args.steps
        label = f"{d_in}x{d_sae} k{k} B{B}"
        pool = synthetic_pool(d_in, k, B, N_POOL + 1, seed=ci)
        x_eval = pool.pop()
        floor = encoder_floor_ms(d_in, d_sae, B)
        makers: list[tuple[str, Callable[[], Method]]] = [
            *((name, lambda name=name, kw=kw: OursFusedStep(d_in, d_sae, k, pool[0], name=name, **kw)) for name, kw in FUSED_VARIANTS.items()),
            ("ours (triton, graph)", lambda: Ours(d_in, d_sae, k, pool[0], backend="triton", feature_major=True, graph=True, bf16=True)),
            ("ours (project Trainer.train_step)", lambda: ProjectTrainer(d_in, d_sae, k, pool[0])),
            ("ours (triton, no graph)", lambda: Ours(d_in, d_sae, k, pool[0], backend="triton", feature_major=True, graph=False, bf16=True)),
            (
                "ours (triton, row-major W_enc, graph)",
                lambda: Ours(d_in, d_sae, k, pool[0], backend="triton", feature_major=False, graph=True, bf16=True),
            ),
            ("ours (torch)", lambda: Ours(d_in, d_sae, k, pool[0], backend="torch", feature_major=False, graph=False, bf16=False)),
            ("sparsify TopK", lambda: Sparsify(d_in, d_sae, k, pool[0])),
            ("SAELens TopK", lambda: SaeLens(d_in, d_sae, k, pool[0], batch=False)),
            ("SAELens BatchTopK", lambda: SaeLens(d_in, d_sae, k, pool[0], batch=True)),
        ]
        only = [p for p in args.only.split(",") if p]
        for name, make in makers:
            if only and not any(name.startswith(p) for p in only):
                continue
            try:
                row = run_method(make, pool, x_eval, steps)
            except Exception as exc:  # a peer that cannot run here is reported, not hidden
                traceback.print_exc()
                row = dict(method=name, error=f"{type(exc).__name__}: {exc}"[:200])
            row.update(config=label, floor_tok_per_s=B / floor * 1e3, steps=steps, tokens=steps * B)
            results.append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
        pool = x_eval = None  # the makers above hold them: drop them before the next config
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print("\n| config | method | tokens/s | % of encoder floor | ms/step | peak GiB | FVU after equal tokens |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['config']} | {r['method']} | error: {r['error']} | | | | |")
            continue
        frac = r["tok_per_s"] / r["floor_tok_per_s"]
        print(
            f"| {r['config']} | {r['method']} | {r['tok_per_s'] / 1e6:.3f}M | {frac:.1%} | {r['ms_per_step']:.3f} | "
            f"{r['peak_gib']:.2f} | {r['fvu']:.4f} |"
        )
    print("\nencoder-matmul floor (tokens/s): " + ", ".join(sorted({f"{r['config']}: {r['floor_tok_per_s'] / 1e6:.2f}M" for r in results})))


if __name__ == "__main__":
    main()
