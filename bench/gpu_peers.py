"""GPU training speed of the rules with a peer implementation, each against its nearest peer
in one process (device GPU; not a test): our JumpReLU against SAELens's JumpReLU training
SAE, our Matryoshka BatchTopK against SAELens's, our transcoder and skip transcoder against
EleutherAI sparsify's, and our TopK (the fused step) as the reference row.

Every method trains from its own init on the same synthetic batches (bench/gpu_train.py's
synthetic_pool, scaled once to unit mean squared norm, the scale our Trainer trains at, so
both libraries see the same numbers; a transcoder's target is y = f(x), a fixed random
GELU MLP of x, of the same width because sparsify's transcoders predict one), at the same
learning rate. Reported per method: tokens/s over the timed steps (CUDA events, the first
WARMUP steps excluded; on the CPU wall time), peak GPU memory above the shared data, and
on a held-out batch after the same number of tokens the FVU (of the target) and the
training pass's L0.

"ours" rows are sae.trainer.Trainer.train_step with the step the Trainer picks on CUDA at
the default precision (bf16 encoder product; topk: the fused step as a CUDA graph; the
other rules and transcoders: the autograd step through the triton kernels), with the rule's
default settings except constant lr (no warm-up or decay) and a short L0 warm-up for
JumpReLU (config_for). Peers run as their own trainers drive them:
- SAELens (JumpReLUTrainingSAE, MatryoshkaBatchTopKTrainingSAE): training_forward_pass
  under bf16 autocast (the trainer's `autocast`) with its coefficients (the L0
  coefficient's linear warm-up, CoefficientScheduler) and dead-neuron mask (its trainer's
  fired counters, window 1000 steps), the per-step firing bookkeeping, backward, grad-norm
  clipping at 1, torch Adam (betas 0.9, 0.999). Their settings are ours where the two
  share one: JumpReLU's lambda, bandwidth, initial threshold and L0 warm-up; Matryoshka's
  k, prefix widths (ours: the paper's) and aux weight (1/32).
- sparsify SparseCoder(transcode=True, skip_connection=...): forward(x, y) (its own bf16
  autocast, fused encoder, Triton decoder), fvu backward, torch Adam; its trainer neither
  renormalises a transcoder's decoder nor removes the parallel gradient, so neither is done.

Run on the device, the peers as wheels carried into a --target folder (the device has no
registry; see the wheel list below):
    pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:. python bench/gpu_peers.py [--configs 0,1] [--only PREFIXES] [--json out.json]
    PYTHONPATH=...:. python bench/gpu_peers.py --device cpu --tiny      # every row, tiny, on a CPU
Wheels (`pip download --no-deps --only-binary=:all: --python-version 3.12 --platform
manylinux_2_28_x86_64`): sae-lens==6.54.12 eai-sparsify==1.3.3 natsort schedulefree
and what the device lacks of sae_lens's imports (bench/gpu_train.py lists them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from gpu_train import LR, N_POOL, WARMUP, Method, fvu_of, synthetic_pool

from sae.config import TrainConfig
from sae.data import TensorSource
from sae.rules.matryoshka import default_widths
from sae.trainer import Trainer

CONFIGS = [(768, 24576, 32, 4096), (2048, 65536, 64, 4096)]
TINY = (32, 256, 8, 256)
BF16 = torch.bfloat16
#: L0 warm-up steps for both JumpReLUs (ours defaults to a tenth of the run; SAELens to none)
JUMPRELU_WARMUP = 10
#: SAELens trainer's dead_feature_window (steps without firing before a feature counts as dead)
SAELENS_DEAD_WINDOW = 1000


def paired_target(x: torch.Tensor, seed: int) -> torch.Tensor:
    """y = f(x) for transcoders: a fixed random GELU MLP of x (hidden width 4 d_in), at x's scale."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    d = x.shape[1]
    W1 = torch.randn(d, 4 * d, device=x.device, generator=gen) / d**0.5
    W2 = torch.randn(4 * d, d, device=x.device, generator=gen) / (4 * d) ** 0.5
    return torch.nn.functional.gelu(x @ W1) @ W2


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA (every method's training precision there); off on the CPU."""
    return torch.autocast(device.type, dtype=BF16, enabled=device.type == "cuda")


def config_for(arch: str, d_in: int, d_sae: int, k: int, B: int, steps: int, device: str, **extra) -> TrainConfig:
    """The Trainer's config of an "ours" row: the rule's defaults, constant lr."""
    own = {"jumprelu_warmup_steps": JUMPRELU_WARMUP} if arch == "jumprelu" else {"k": k}
    return TrainConfig(arch=arch, d_in=d_in, d_sae=d_sae, tokens=steps * B, batch_size=B, lr=LR, device=device,
                       warmup_steps=0, decay_fraction=0.0, init_tokens=B, **own, **extra)


class Ours(Method):
    """sae.trainer.Trainer.train_step for a config (the step it picks on the device)."""

    def __init__(self, name: str, config: TrainConfig, x0: torch.Tensor, y0: torch.Tensor | None):
        source = TensorSource(x0.cpu(), target=None if y0 is None else y0.cpu())
        self.trainer = Trainer.start(config, source, out=None, command=[])
        self.name = f"{name} [{self.trainer.step_kind}]"
        self.transcoder = y0 is not None

    def step(self, x, y=None):
        self.trainer.train_step(x if y is None else torch.cat([x, y], dim=1))

    @torch.no_grad()
    def reconstruct(self, x):
        t = self.trainer
        with autocast(x.device):
            y_hat, code, _ = t.model(x * t.input_scale)
        return y_hat.float() / t.target_scale, code.l0().float().mean()


class SaeLensRule(Method):
    """A SAELens training SAE stepped as sae_lens.training.sae_trainer.SAETrainer._train_step does."""

    def __init__(self, name: str, sae, device: torch.device):
        from sae_lens.saes.sae import TrainCoefficientConfig, TrainStepInput
        from sae_lens.training.optim import CoefficientScheduler

        self.name, self.sae, self.device, self.TrainStepInput = name, sae, device, TrainStepInput
        self.opt = torch.optim.Adam(sae.parameters(), lr=LR, betas=(0.9, 0.999))
        self.schedulers = {}
        for key, cfg in sae.get_coefficients().items():
            cfg = cfg if isinstance(cfg, TrainCoefficientConfig) else TrainCoefficientConfig(value=cfg, warm_up_steps=0)
            self.schedulers[key] = CoefficientScheduler(warm_up_steps=cfg.warm_up_steps, final_value=cfg.value)
        self.since_fired = torch.zeros(sae.cfg.d_sae, device=device)
        self.act_freq = torch.zeros(sae.cfg.d_sae, device=device)
        self.n = 0

    def _pass(self, x):
        return self.sae.training_forward_pass(self.TrainStepInput(
            sae_in=x, coefficients={key: s.value for key, s in self.schedulers.items()},
            dead_neuron_mask=(self.since_fired > SAELENS_DEAD_WINDOW).bool(), n_training_steps=self.n,
            is_logging_step=False))

    def step(self, x, y=None):
        self.sae.train()
        with autocast(self.device):
            out = self._pass(x)
            with torch.no_grad():
                firing = out.feature_acts.bool().float()
                self.since_fired += 1
                self.since_fired[firing.sum(-2).bool()] = 0
                self.act_freq += firing.sum(0)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad()
        for s in self.schedulers.values():
            s.step()
        self.n += 1

    @torch.no_grad()
    def reconstruct(self, x):
        with autocast(self.device):
            out = self._pass(x)
        return out.sae_out.float(), (out.feature_acts != 0).sum(-1).float().mean()


def saelens_jumprelu(d_in: int, d_sae: int, device: torch.device, like: TrainConfig) -> SaeLensRule:
    from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

    rule = like.rule
    cfg = JumpReLUTrainingSAEConfig(d_in=d_in, d_sae=d_sae, device=str(device), l0_coefficient=rule.jumprelu_l0_coefficient,
                                    jumprelu_bandwidth=rule.jumprelu_bandwidth, jumprelu_init_threshold=rule.jumprelu_init_threshold,
                                    l0_warm_up_steps=rule.jumprelu_warmup_steps)
    return SaeLensRule("SAELens JumpReLU", JumpReLUTrainingSAE(cfg), device)


def saelens_matryoshka(d_in: int, d_sae: int, k: int, device: torch.device, like: TrainConfig) -> SaeLensRule:
    from sae_lens import MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig

    widths = [int(w) for w in like.rule.matryoshka_widths.split(",")]
    cfg = MatryoshkaBatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, device=str(device), matryoshka_widths=widths,
                                               aux_loss_coefficient=like.aux_alpha)
    return SaeLensRule("SAELens Matryoshka BatchTopK", MatryoshkaBatchTopKTrainingSAE(cfg), device)


class SparsifyTranscoder(Method):
    """sparsify's SparseCoder as a (skip) transcoder, stepped as its trainer steps one."""

    def __init__(self, d_in: int, d_sae: int, k: int, device: torch.device, skip: bool):
        from sparsify import SparseCoder, SparseCoderConfig

        self.name = "sparsify " + ("skip transcoder" if skip else "transcoder")
        cfg = SparseCoderConfig(num_latents=d_sae, k=k, transcode=True, skip_connection=skip)
        self.sae = SparseCoder(d_in, cfg, device=device, dtype=torch.float32)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=LR)

    def step(self, x, y=None):
        self.opt.zero_grad(set_to_none=True)
        self.sae(x, y).fvu.backward()
        self.opt.step()

    @torch.no_grad()
    def reconstruct(self, x, y=None):
        out = self.sae(x, y)
        return out.sae_out.float(), (out.latent_acts > 0).sum(-1).float().mean()


def run_method(make: Callable[[], Method], pool: list[tuple[torch.Tensor, torch.Tensor | None]],
               held_out: tuple[torch.Tensor, torch.Tensor | None], steps: int, device: torch.device) -> dict:
    """Build, WARMUP steps, time steps - WARMUP more; then held-out FVU and L0."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t_build = time.perf_counter()
    method = make()
    for i in range(WARMUP):
        method.step(*pool[i % len(pool)])
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    build_s = time.perf_counter() - t_build
    t0 = time.perf_counter()
    for i in range(WARMUP, steps):
        method.step(*pool[i % len(pool)])
    if cuda:
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / (steps - WARMUP)
    else:
        ms = (time.perf_counter() - t0) * 1e3 / (steps - WARMUP)
    x, y = held_out
    y_hat, l0 = method.reconstruct(x, y) if isinstance(method, SparsifyTranscoder) else method.reconstruct(x)
    row = dict(method=method.name, ms_per_step=ms, tok_per_s=x.shape[0] / ms * 1e3, fvu=fvu_of(x if y is None else y, y_hat),
               l0=float(l0), build_and_warmup_s=build_s,
               peak_gib=(torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else float("nan"))
    del method
    return row


def makers(d_in: int, d_sae: int, k: int, B: int, steps: int, device: torch.device,
           x0: torch.Tensor, y0: torch.Tensor, jumprelu: dict) -> list[tuple[str, bool, Callable[[], Method]]]:
    """(name, transcoder?, build) of every row of one config; jumprelu: settings over both
    JumpReLUs' defaults."""
    dev = str(device)
    jump = config_for("jumprelu", d_in, d_sae, k, B, steps, dev, **jumprelu)
    matr = config_for("matryoshka", d_in, d_sae, k, B, steps, dev)
    assert matr.rule.matryoshka_widths == ",".join(map(str, default_widths(d_sae)))
    tc = {"d_out": d_in}
    return [
        ("ours topk", False, lambda: Ours("ours topk", config_for("topk", d_in, d_sae, k, B, steps, dev), x0, None)),
        ("ours jumprelu", False, lambda: Ours("ours jumprelu", jump, x0, None)),
        ("SAELens JumpReLU", False, lambda: saelens_jumprelu(d_in, d_sae, device, jump)),
        ("ours matryoshka", False, lambda: Ours("ours matryoshka", matr, x0, None)),
        ("SAELens Matryoshka", False, lambda: saelens_matryoshka(d_in, d_sae, k, device, matr)),
        ("ours transcoder", True, lambda: Ours("ours transcoder (topk)", config_for("topk", d_in, d_sae, k, B, steps, dev, **tc),
                                               x0, y0)),
        ("sparsify transcoder", True, lambda: SparsifyTranscoder(d_in, d_sae, k, device, skip=False)),
        ("ours skip transcoder", True, lambda: Ours("ours skip transcoder (topk)",
                                                    config_for("topk", d_in, d_sae, k, B, steps, dev, skip=True, **tc), x0, y0)),
        ("sparsify skip transcoder", True, lambda: SparsifyTranscoder(d_in, d_sae, k, device, skip=True)),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--configs", default="0", help=f"indices into {CONFIGS}")
    ap.add_argument("--tiny", action="store_true", help=f"{TINY} and a few steps: checks every row runs (e.g. on a CPU)")
    ap.add_argument("--steps", type=int, default=None, help="steps per method (default 150; --tiny 14)")
    ap.add_argument("--only", default="", help="comma-separated row-name prefixes to run (default all)")
    ap.add_argument("--jumprelu-init-threshold", type=float, default=None,
                    help="both JumpReLUs' starting threshold (default: ours, Gemma Scope's 0.001, at which half of d_sae "
                         "fires on this data at first)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda:  # sparsify's Triton decoder needs a GPU; its eager twin on a CPU
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    shapes = [TINY] if args.tiny else [CONFIGS[int(c)] for c in args.configs.split(",")]
    steps = args.steps or (WARMUP + 4 if args.tiny else 150)
    only = [p for p in args.only.split(",") if p]
    results = []
    for ci, (d_in, d_sae, k, B) in enumerate(shapes):
        label = f"{d_in}x{d_sae} k{k} B{B}"
        xs = synthetic_pool(d_in, k, B, N_POOL + 1, seed=ci, device=str(device))
        scale = float(xs[0].pow(2).sum(1).mean().rsqrt())
        xs = [x * scale for x in xs]
        ys = [paired_target(x, seed=100 + ci) for x in xs]
        held_x, held_y = xs.pop(), ys.pop()
        jumprelu = {} if args.jumprelu_init_threshold is None else {"jumprelu_init_threshold": args.jumprelu_init_threshold}
        for name, transcoder, make in makers(d_in, d_sae, k, B, steps, device, xs[0], ys[0], jumprelu):
            if only and not any(name.startswith(p) for p in only):
                continue
            pool = [(x, y if transcoder else None) for x, y in zip(xs, ys)]
            try:
                row = run_method(make, pool, (held_x, held_y if transcoder else None), steps, device)
            except Exception as exc:  # noqa: BLE001 - a row that cannot run here is reported, the others still run
                traceback.print_exc()
                row = dict(method=name, error=f"{type(exc).__name__}: {exc}"[:200])
            row.update(config=label, steps=steps, tokens=steps * B)
            results.append(row)
            print(json.dumps(row), flush=True)
            if cuda:
                torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print("\n| config | method [our step] | tokens/s | ms/step | peak GiB | FVU after equal tokens | L0 |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['config']} | {r['method']} | error: {r['error']} | | | | |")
            continue
        print(f"| {r['config']} | {r['method']} | {r['tok_per_s'] / 1e6:.3f}M | {r['ms_per_step']:.3f} | {r['peak_gib']:.2f} | "
              f"{r['fvu']:.4f} | {r['l0']:.1f} |")


if __name__ == "__main__":
    main()
