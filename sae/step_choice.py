"""Which training step trains a config (`workbench train --step`), and building it.

"autograd" (sae.autograd_step) trains every rule; "fused" (sae.fused_step) trains
arch topk (replayed as a CUDA graph on CUDA), mutual-choice and gba through Triton kernels;
"data-parallel" (sae.distributed) is the autograd step over torchrun's processes; "auto"
is fused where it can train the config on CUDA, else autograd (always autograd for a
transcoder: the fused step trains autoencoders only). In a process group of more than one
rank (torchrun) every step is data parallel: "fused" builds
sae.fused_data_parallel.FusedDataParallelStep (eager: no CUDA graph), "autograd" resolves
to "data-parallel", and "auto" to one of the two by the same rule. "shard-latents"
(sae.latent_shard) splits a TopK SAE's features over the ranks instead of the batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from sae.autograd_step import AutogradStep
from sae.config import TrainConfig
from sae.errors import SAEError
from sae.model import SparseAutoencoder
from sae.registry import rule_names, training_rule
from sae.step import TrainStep

STEPS = ("auto", "fused", "autograd", "data-parallel", "shard-latents")


def fused_unsupported(config: TrainConfig, backend: str) -> str | None:
    """Why the fused step cannot train config with the (resolved) backend (a sentence
    saying what to do), or None."""
    if config.d_out is not None:
        return 'the fused step trains autoencoders only, not transcoders; use `step="autograd"`'
    if "fused" not in training_rule(config.arch).steps:
        fused = " or ".join(f'`arch="{name}"`' for name in rule_names() if "fused" in training_rule(name).steps)
        return f"the fused step trains {fused} only, not {config.arch}; use `step=\"autograd\"`"
    if several_processes() and not training_rule(config.arch).data_parallel:
        return f'the fused data-parallel step trains per-token rules only, not {config.arch}; train it in one process'
    if backend != "triton":
        return (f'the fused step runs Triton kernels, which need `device="cuda"` (not {config.device}) or, on the CPU, '
                '`backend="triton"` under TRITON_INTERPRET=1 (slow, for tests); use `device="cuda"` or `step="autograd"`')
    return None


def resolve_step(config: TrainConfig, step: str, backend: str) -> str:
    """The step kind `step` names for this config: "auto" resolved; "fused" where it cannot
    train the config is a SAEError saying why."""
    if step not in STEPS:
        raise SAEError(f"unknown `step=\"{step}\"`: choose one of {', '.join(STEPS)}")
    if step == "auto":
        fast = fused_unsupported(config, backend) is None and torch.device(config.device).type == "cuda"
        step = "fused" if fast else "autograd"
    elif step == "fused":
        why = fused_unsupported(config, backend)
        if why is not None:
            raise SAEError(f'`step="fused"` cannot train this run: {why}')
    return "data-parallel" if step == "autograd" and several_processes() else step


def several_processes() -> bool:
    """Whether this process is one rank of a process group of more than one (torchrun)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def build_step(config: TrainConfig, model: SparseAutoencoder, step: str, backend: str) -> TrainStep:
    """The step of kind resolve_step(config, step, backend) training model (on its device).
    --precision bf16 on CUDA: a bf16 encoder product; the fused step also keeps the
    decoder's loss gradient and the weights' Adam moments in bf16 (less memory traffic at
    no measurable cost in FVU: bench/gpu_adam_moments.py). The CPU trains float32."""
    kind = resolve_step(config, step, backend)
    on_cuda = torch.device(config.device).type == "cuda"
    low = on_cuda and config.precision == "bf16"
    if kind == "fused":
        from sae.fused_step import FusedTopKStep
        from sae.graph_step import CudaGraphStep

        model.make_encoder_feature_major()
        dtype = torch.bfloat16 if low else torch.float32
        options = dict(precision=config.precision if on_cuda else "fp32", grad_out_dtype=dtype, moments_dtype=dtype,
                       k_aux=config.aux_k, aux_alpha=config.aux_alpha, backend=backend)
        if several_processes():
            from sae.fused_data_parallel import FusedDataParallelStep

            return FusedDataParallelStep(model, config.learning_rate, config.batch_size, **options)
        fused = FusedTopKStep(model, lr=config.learning_rate, **options)
        return CudaGraphStep(fused, key=model.rule.graph_key) if on_cuda and model.rule.fused_graph else fused
    if kind == "shard-latents":
        from sae.latent_shard import ShardedTopKStep

        if config.arch != "topk" or config.aux != "none" or config.d_out is not None:
            raise SAEError('`step="shard-latents"` trains `arch="topk"` autoencoders with `aux="none"`; '
                           f"got arch {config.arch}, aux {config.aux}{', a transcoder' if config.d_out is not None else ''}")
        if config.checkpoint_every is None:
            raise SAEError('`step="shard-latents"` saves at the same steps on every rank: pass `checkpoint_every`')
        return ShardedTopKStep(model, config.learning_rate, config.device, autocast_dtype=torch.bfloat16 if low else None)
    options = {"autocast_dtype": torch.bfloat16 if low else None, "aux_k": config.aux_k, "aux_alpha": config.aux_alpha}
    if kind == "data-parallel":
        from sae.distributed import DataParallelStep

        return DataParallelStep(config, model, **options)
    return AutogradStep(model, config.learning_rate, **options)
