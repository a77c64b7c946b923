"""Sample efficiency: held-out FVU against tokens and seconds, our TopK trainer against
EleutherAI sparsify's TopK, on one fresh synthetic stream (each batch seen once).

Ours trains through the project's public API as `workbench train` runs it: sae.trainer.Trainer
with its default settings for arch topk (default lr, schedule, input scaling, AuxK), whose
step on CUDA is the fused TopK step (sae.fused_step.FusedTopKStep replayed as a CUDA graph)
and on a CPU the autograd step. Sparsify trains as its own Trainer trains a TopK SAE on an
activation batch: SparseCoder(d_in, SparseCoderConfig(num_latents, k)) in float32 (its
forward under its own bf16 autocast on CUDA), b_dec set to the first batch's mean, the decoder
renormalised before each forward, the decoder gradient's part along each row removed, its
default learning rate, auxk_alpha 0 (its default). --sparsify-optimizer picks which of its
optimizers: "adam" (torch Adam at 2e-4 / sqrt(num_latents / 2^14) with its linear warm-up
of 1000 steps and linear decay to 0, transformers' get_linear_schedule_with_warmup written
out; a run under 20,000 steps warms up over a twentieth of them, as ours does, so the tiny
CPU preset is not all warm-up) or "signum" (its TrainConfig's default in 1.3.3: schedule-free SignSGD, momentum 0.95,
lr 5e-3 / sqrt(num_latents / 2^14)).

The data: x = the sum of k/2 of 8 d_in unit directions per token (Zipf frequencies,
exponential magnitudes) + noise, the generator of bench/gpu_train.py, batch b drawn from a
generator seeded by (seed, b) on the device, so every method sees the same batches in the
same order; the held-out batch comes from a seed no training batch uses. Both methods train
for the same tokens; every --eval-every steps the held-out FVU is measured (outside the
timed training time; CUDA synchronised before each clock read). For each FVU level the
tokens and seconds each method first reaches it (linear between evaluations) are printed
with the ratio ours / sparsify.

Imports only sae/ and sparsify (no workbench: the device run carrying the peers' wheels
cannot also carry duckdb). Install sparsify beside the project without its dependencies:
    pip install --no-deps --target /tmp/sparsify-site eai-sparsify==1.3.3 schedulefree
    PYTHONPATH=.:/tmp/sparsify-site python bench/sample_efficiency.py --device cpu
    PYTHONPATH=.:/tmp/sparsify-site python bench/sample_efficiency.py --preset 768 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from sae.config import TrainConfig
from sae.losses import fvu
from sae.trainer import Trainer

#: (d_in, d_sae, k, batch, tokens) of each preset.
PRESETS = {
    "tiny": (128, 4096, 8, 512, 307_200),
    "768": (768, 24576, 32, 4096, 100_000_000),
    "2048": (2048, 65536, 64, 4096, 100_000_000),
}


class SyntheticStream:
    """An endless ActivationSource of synthetic batches (module doc); batch b depends only on
    (seed, b), so any number of methods can read the same fresh stream."""

    d_out = None

    def __init__(self, d_in: int, k: int, device: str, seed: int = 0) -> None:
        self.d_in, self.device, self.seed = d_in, torch.device(device), seed
        gen = torch.Generator(device=self.device).manual_seed(seed)
        n_gt = 8 * d_in
        V = torch.randn(n_gt, d_in, device=self.device, generator=gen)
        self.V = V / V.norm(dim=1, keepdim=True)
        self.freq = 1.0 / torch.arange(1, n_gt + 1, device=self.device, dtype=torch.float32) ** 0.7
        self.per_token = max(k // 2, 1)

    def batch(self, b: int, size: int) -> torch.Tensor:
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + b + 1)
        idx = torch.multinomial(self.freq, size * self.per_token, replacement=True, generator=gen).view(size, self.per_token)
        mag = torch.empty(size, self.per_token, device=self.device).exponential_(generator=gen)
        x = torch.nn.functional.embedding_bag(idx, self.V, per_sample_weights=mag, mode="sum")
        return x + 0.05 * torch.randn(size, self.d_in, device=self.device, generator=gen)

    def batches(self, batch_size: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        b = start_batch
        while True:
            yield self.batch(b, batch_size)
            b += 1

    def held_out(self, size: int) -> torch.Tensor:
        return self.batch(-10**6, size)

    def describe(self) -> dict[str, Any]:
        return {"source": "synthetic stream", "d": self.d_in}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_curve(step: Callable[[torch.Tensor], None], reconstruct: Callable[[torch.Tensor], torch.Tensor],
                stream: SyntheticStream, batch: int, steps: int, eval_every: int, x_eval: torch.Tensor) -> list[dict[str, float]]:
    """Run steps fresh batches through step; every eval_every steps (and at the end) the
    held-out FVU, with the training seconds so far (evaluation not counted)."""
    curve, seconds = [], 0.0
    batches = stream.batches(batch, 0)
    for i in range(1, steps + 1):
        x = next(batches)
        _sync(stream.device)
        t0 = time.perf_counter()
        step(x)
        _sync(stream.device)
        seconds += time.perf_counter() - t0
        if i % eval_every == 0 or i == steps:
            with torch.no_grad():
                curve.append({"step": i, "tokens": i * batch, "seconds": seconds, "fvu": float(fvu(x_eval, reconstruct(x_eval)))})
    return curve


def ours(d_in: int, d_sae: int, k: int, batch: int, tokens: int, device: str, stream: SyntheticStream,
         **settings: Any) -> tuple[Callable, Callable, str]:
    """The project's Trainer with its defaults (settings override them): (step, reconstruct, step kind)."""
    config = TrainConfig("topk", d_in, d_sae, tokens, k=k, batch_size=batch, device=device, **settings)
    trainer = Trainer.start(config, stream, None, [])

    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        autocast = device.startswith("cuda") and config.precision == "bf16"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            return trainer.model.reconstruct(x * trainer.input_scale).float() / trainer.input_scale

    return trainer.train_step, reconstruct, trainer.step_kind


def sparsify(d_in: int, d_sae: int, k: int, batch: int, tokens: int, device: str, optimizer: str,
             warmup: int = 1000) -> tuple[Callable, Callable]:
    """Sparsify's SparseCoder trained as its Trainer trains it (module doc): (step, reconstruct)."""
    if not device.startswith("cuda"):  # its Triton decoder needs a GPU; its own switch picks the eager one
        os.environ["SPARSIFY_DISABLE_TRITON"] = "1"
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=k), device=device, dtype=torch.float32)
    steps = tokens // batch
    if optimizer == "adam":
        opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (d_sae / 2**14) ** 0.5)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: s / max(1, warmup) if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)))
        evaluating = training = lambda: None  # noqa: E731
    elif optimizer == "signum":
        from schedulefree import ScheduleFreeWrapper
        from sparsify.sign_sgd import SignSGD

        opt = ScheduleFreeWrapper(SignSGD(sae.parameters(), lr=5e-3 / (d_sae / 2**14) ** 0.5), momentum=0.95)
        opt.train()
        schedule, evaluating, training = None, opt.eval, opt.train
    else:
        raise ValueError(f"unknown sparsify optimizer {optimizer!r}")
    first = [True]

    def step(x: torch.Tensor) -> None:
        if first[0]:
            sae.b_dec.data = x.mean(0).to(sae.dtype)
            first[0] = False
        sae.set_decoder_norm_to_unit_norm()
        sae(x).fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        if schedule is not None:
            schedule.step()

    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        evaluating()
        out = sae(x).sae_out.float()
        training()
        return out

    return step, reconstruct


def first_reach(curve: list[dict[str, float]], level: float, key: str) -> float | None:
    """The tokens (or seconds) at which the curve first gets to FVU <= level, linear between
    evaluations; None if it never does."""
    prev = None
    for row in curve:
        if row["fvu"] <= level:
            if prev is None or prev["fvu"] == row["fvu"]:
                return row[key]
            t = (prev["fvu"] - level) / (prev["fvu"] - row["fvu"])
            return prev[key] + t * (row[key] - prev[key])
        prev = row
    return None


def auto_levels(curves: list[list[dict[str, float]]], n: int = 5) -> list[float]:
    """n FVU levels every curve reaches: geometric between the worst curve's FVU a fifth of
    the way in and the worst final FVU (plus 0.5%)."""
    low = max(c[-1]["fvu"] for c in curves) * 1.005
    high = max(c[max(0, len(c) // 5 - 1)]["fvu"] for c in curves)
    high = max(high, low * 1.01)
    return [high * (low / high) ** (i / (n - 1)) for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    ap.add_argument("--tokens", type=int, default=None, help="training tokens per method (default: the preset's)")
    ap.add_argument("--eval-every", type=int, default=None, help="steps between held-out evaluations (default: steps / 40)")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--sparsify-optimizer", choices=("adam", "signum"), default="adam")
    ap.add_argument("--levels", default="", help="comma-separated FVU levels (default: five both curves reach)")
    ap.add_argument("--ours", default="{}", help='JSON of TrainConfig settings over our defaults, to ablate one on '
                    'the GPU (e.g. \'{"aux": "none"}\', \'{"precision": "fp32"}\', \'{"decay_fraction": 1.0}\')')
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    d_in, d_sae, k, batch, tokens = PRESETS[args.preset]
    tokens = args.tokens or tokens
    steps = tokens // batch
    eval_every = args.eval_every or max(1, steps // 40)
    torch.backends.cuda.matmul.allow_tf32 = False
    stream = SyntheticStream(d_in, k, device, args.seed)
    x_eval = stream.held_out(args.eval_tokens)
    print(f"{d_in}x{d_sae} k{k} batch {batch}, {steps} steps ({steps * batch:,} tokens) on {device}; torch {torch.__version__}", flush=True)

    step, reconstruct, kind = ours(d_in, d_sae, k, batch, steps * batch, device, stream, **json.loads(args.ours))
    curves = {f"ours ({kind} step)": train_curve(step, reconstruct, stream, batch, steps, eval_every, x_eval)}
    name = f"sparsify ({args.sparsify_optimizer})"
    step, reconstruct = sparsify(d_in, d_sae, k, batch, steps * batch, device, args.sparsify_optimizer, warmup=min(1000, steps // 20))
    curves[name] = train_curve(step, reconstruct, stream, batch, steps, eval_every, x_eval)
    for method, curve in curves.items():
        print(f"{method}: " + ", ".join(f"{r['tokens'] / 1e6:.2f}M {r['fvu']:.4f}" for r in curve[:: max(1, len(curve) // 8)]) +
              f"; final {curve[-1]['fvu']:.4f} after {curve[-1]['seconds']:.1f} s", flush=True)

    levels = [float(v) for v in args.levels.split(",") if v] or auto_levels(list(curves.values()))
    (a, ca), (b, cb) = curves.items()
    rows = []
    print(f"\n| held-out FVU | {a} tokens | {b} tokens | tokens ratio | {a} s | {b} s | seconds ratio |")
    print("|---|---|---|---|---|---|---|")
    for level in levels:
        ta, tb = first_reach(ca, level, "tokens"), first_reach(cb, level, "tokens")
        sa, sb = first_reach(ca, level, "seconds"), first_reach(cb, level, "seconds")
        tr = ta / tb if ta and tb else math.nan
        sr = sa / sb if sa and sb else math.nan
        rows.append({"fvu": level, "tokens": [ta, tb], "seconds": [sa, sb], "tokens_ratio": tr, "seconds_ratio": sr})
        fmt = lambda v, f: "never" if v is None else format(v, f)  # noqa: E731
        print(f"| {level:.4f} | {fmt(ta and ta / 1e6, '.3f')}M | {fmt(tb and tb / 1e6, '.3f')}M | {tr:.2f} | "
              f"{fmt(sa, '.1f')} | {fmt(sb, '.1f')} | {sr:.2f} |")
    if args.json:
        config = dict(d_in=d_in, d_sae=d_sae, k=k, batch=batch, tokens=steps * batch, device=device,
                      sparsify_optimizer=args.sparsify_optimizer, ours=json.loads(args.ours))
        with open(args.json, "w") as f:
            json.dump({"config": config, "curves": curves, "levels": rows}, f, indent=1)

if __name__ == "__main__":
    main()
