"""Each training rule's step through the project's trainer on a GPU: tokens/s, peak memory,
and checks that it trains (a device benchmark; exits 1 if a check fails).

For every registered rule, and transcoders (ARCH:transcoder, a target of another width;
ARCH:skip, a skip transcoder), each with its default aux loss (CASE/AUX: another one) and precision (on CUDA the
bf16 encoder product), the step the Trainer picks with step "auto" (CASE@STEP: another one) is started on a
GPU-resident TensorSource (a fixed random low-rank-plus-noise tensor; a transcoder's target
a fixed nonlinear map of it), so the data path is not what is timed. Trainer.fit runs --warmup steps, then --steps more
between two CUDA synchronisations. Checks: the rule trains without an error (such as a
dtype mismatch) or a non-finite loss (Trainer.check_finite), and the logged FVU falls from
the first log to the last. One table line per rule.

    python3 bench/gpu_rules.py [--large] [--steps 100] [--warmup 300]   # 768x24576 k32 B4096 (--large: 2048x65536 k64)
    python3 bench/gpu_rules.py --device cpu --tiny                      # the same checks, tiny, here
    TRITON_INTERPRET=1 python3 bench/gpu_rules.py --device cpu --tiny --backend triton   # through the Triton kernels

On CPU the trainer is switched to CUDA's path (bf16 autocast, and the sparse decode up to
CUDA's code width) so the check covers it; --backend triton runs CUDA's kernels there too.
GBA's codes are wide until its biases settle, hence the long default warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import sae.model
from sae.config import TrainConfig
from sae.data import TensorSource
from sae.registry import rule_names
from sae.trainer import Trainer

#: Every registered rule, then transcoder rows (ARCH:transcoder, ARCH:skip).
RULES = (*rule_names(), "topk:transcoder", "topk:skip", "jumprelu:transcoder", "matryoshka:skip")


def low_rank_data(n: int, d_in: int, device: str, seed: int = 0) -> torch.Tensor:
    """[n, d_in]: a rank-d_in/8 signal with a decaying spectrum, plus isotropic noise."""
    gen = torch.Generator(device=device).manual_seed(seed)
    rank = max(d_in // 8, 2)
    basis = torch.randn(rank, d_in, generator=gen, device=device)
    scales = torch.arange(1, rank + 1, device=device, dtype=torch.float32).pow(-0.5)
    coords = torch.randn(n, rank, generator=gen, device=device) * scales
    return coords @ basis + 0.1 * torch.randn(n, d_in, generator=gen, device=device)


@contextlib.contextmanager
def profiled(on: bool) -> Iterator[Any]:
    """torch.profiler over the block when asked (CPU and CUDA activity), else nothing."""
    if not on:
        yield None
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        yield prof


def transcoder_target(data: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """[n, 3 d_in / 4]: a fixed random two-layer tanh map of the data (a transcoder's target)."""
    gen = torch.Generator(device=data.device).manual_seed(seed)
    d_in = data.shape[1]
    W1 = torch.randn(d_in, 2 * d_in, generator=gen, device=data.device) / d_in**0.5
    W2 = torch.randn(2 * d_in, 3 * d_in // 4, generator=gen, device=data.device) / (2 * d_in) ** 0.5
    return torch.tanh(data @ W1) @ W2


def run_rule(case: str, data: torch.Tensor, d_sae: int, k: int, B: int, warmup: int, steps: int, device: str,
             profile: bool = False, backend: str | None = None) -> dict:
    """case: a rule's name, or ARCH:transcoder / ARCH:skip for a (skip) transcoder of that rule,
    either with /AUX for another aux loss than the rule's default (mutual-choice/none), and
    @STEP for another step than "auto" picks (gba@autograd)."""
    case_aux, _, step = case.partition("@")
    case_shape, _, aux = case_aux.partition("/")
    arch, _, kind = case_shape.partition(":")
    target = transcoder_target(data) if kind else None
    shape = {"d_out": target.shape[1], "skip": kind == "skip"} if kind else {}
    if aux:
        shape["aux"] = aux
    config = TrainConfig(arch=arch, d_in=data.shape[1], d_sae=d_sae, k=k, batch_size=B,
                         tokens=(warmup + steps) * B, device=device, warmup_steps=0, decay_fraction=0.0,
                         init_tokens=B, log_every=max(1, (warmup + steps) // 20), seed=0, **shape)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer.start(config, TensorSource(data, target=target), out=None, command=[], backend=backend, step=step or "auto")
    if not cuda:  # CUDA's precision through the CPU's autocast
        trainer.stepper.autocast_dtype = torch.bfloat16
    failure = ""
    try:
        trainer.fit(until_step=warmup, progress=False)
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        with profiled(profile) as prof:
            trainer.fit(until_step=warmup + steps, progress=False)
            if cuda:
                torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        if prof is not None:
            print(f"--- {case}: the timed steps' most expensive operations")
            print(prof.key_averages().table(sort_by="self_cpu_time_total" if not cuda else "self_cuda_time_total", row_limit=12))
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
        trainer.check_finite()
    except Exception as e:  # noqa: BLE001 - a rule that fails to train is this table's finding, the others still run
        failure, elapsed = f"{type(e).__name__}: {str(e).splitlines()[0]}", float("nan")
    fvus = [h["fvu"] for h in trainer.history]
    if not failure and not (len(fvus) >= 2 and fvus[-1] < fvus[0]):
        failure = f"FVU did not fall: {fvus[0]:.3f} -> {fvus[-1]:.3f}"
    return {
        "rule": case, "aux": config.aux, "step": trainer.step_kind, "tok_s": steps * B / elapsed,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "fvu0": fvus[0] if fvus else float("nan"), "fvu": fvus[-1] if fvus else float("nan"),
        "l0": trainer.history[-1]["l0"] if trainer.history else float("nan"), "failure": failure,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--large", action="store_true", help="2048x65536 k64 instead of 768x24576 k32")
    ap.add_argument("--tiny", action="store_true", help="32x256 k8 B256, a few steps: checks the script runs")
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 100; --tiny 10)")
    ap.add_argument("--warmup", type=int, default=None, help="steps before timing (default 300; --tiny 20)")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's costliest operations of the timed steps")
    ap.add_argument("--backend", default=None, help="the kernels' backend (default: the device's; triton on a CPU needs TRITON_INTERPRET=1)")
    args = ap.parse_args()
    if args.device != "cuda":  # CUDA's choice between the sparse decode and a dense product
        sae.model.SPARSE_DECODE_MAX_FRACTION["cpu"] = sae.model.SPARSE_DECODE_MAX_FRACTION["cuda"]
    d_in, d_sae, k, B = (32, 256, 8, 256) if args.tiny else (2048, 65536, 64, 4096) if args.large else (768, 24576, 32, 4096)
    steps = args.steps or (10 if args.tiny else 100)
    warmup = args.warmup if args.warmup is not None else (20 if args.tiny else 300)
    data = low_rank_data(16 * B, d_in, args.device)
    print(f"{d_in}x{d_sae} k{k} B{B} on {torch.cuda.get_device_name() if args.device == 'cuda' else args.device}, "
          f"{warmup} warm-up + {steps} timed steps")
    print(f"{'rule':<20} {'aux':<9} {'step':<9} {'tok/s':>12} {'peak GiB':>9} {'FVU first->last':>16} {'L0':>7}  check")
    failed = False
    for arch in args.rules.split(","):
        r = run_rule(arch, data, d_sae, k, B, warmup, steps, args.device, args.profile, args.backend)
        failed |= bool(r["failure"])
        print(f"{r['rule']:<20} {r['aux']:<9} {r['step']:<9} {r['tok_s']:>12,.0f} {r['peak_gib']:>9.2f} "
              f"{r['fvu0']:>7.3f} -> {r['fvu']:<6.3f} {r['l0']:>7.1f}  {r['failure'] or 'ok'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
