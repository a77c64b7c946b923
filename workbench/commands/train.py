"""`workbench train` (an SAE on one hook of a store) and `workbench eval` (its quality)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from workbench.errors import WorkbenchError


def train_command(
    store: Optional[Path] = typer.Option(None, help="Capture store folder to read activations from (or --model)."),
    hook: str = typer.Option(..., help="Hook to train on, e.g. blocks.2.hook_resid_post (stored, or of --model)."),
    model: Optional[str] = typer.Option(None, help="Train with no store: run this model (any `capture` takes) over --data "
                                        "and train on its activations as they come."),
    data: str = typer.Option("builtin", help="With --model: the text (as `capture --data` takes)."),
    ctx: int = typer.Option(128, help="With --model: context length of each window."),
    arch: str = typer.Option("topk", help="topk | mutual-choice | gba."),
    expansion: Optional[float] = typer.Option(None, help="d_sae = expansion * d_in (default 8 unless --d-sae)."),
    d_sae: Optional[int] = typer.Option(None, "--d-sae", help="Number of SAE features (overrides --expansion)."),
    k: Optional[int] = typer.Option(None, help="Active features per token (topk, mutual-choice: mean per token)."),
    tokens: int = typer.Option(1_000_000, help="Training tokens (steps = tokens // batch-size); the store is cycled."),
    batch_size: int = typer.Option(4096, help="Tokens per step."),
    lr: Optional[float] = typer.Option(None, help="Adam learning rate (default 2e-4 / sqrt(d_sae / 2^14))."),
    out: Path = typer.Option(..., help="Output folder: SAELens cfg.json + sae_weights.safetensors, training.json, checkpoint.pt."),
    device: str = typer.Option("cpu", help="cpu | cuda."),
    precision: str = typer.Option("bf16", help="bf16 | fp32: the encoder product's precision on CUDA (CPU is always fp32)."),
    step: str = typer.Option("auto", help="auto | fused | autograd: fused = the TopK step as Triton kernels with no autograd "
                             "(CUDA, --arch topk, --aux none or auxk, one process); auto = fused where it can run, else autograd."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its checkpoint."),
    seed: int = typer.Option(0, help="Seed for initialisation and data order."),
    aux: Optional[str] = typer.Option(None, help="auxk | aux-zipf | none (default: auxk for topk, aux-zipf for mutual-choice, none for gba)."),
    dead_tokens: int = typer.Option(1_000_000, help="A feature is dead after this many tokens without firing."),
    chunk_tokens: int = typer.Option(65536, help="Tokens per chunk read from the store (with --model: run through it at once)."),
    buffer_chunks: int = typer.Option(4, help="Chunks shuffled together (memory: chunk-tokens * buffer-chunks * d_in values)."),
    resident: Optional[bool] = typer.Option(None, "--resident/--stream", help="Hold the hook's stored activations on --device "
                                            "(default: when they take at most half its free memory) or stream them."),
    gba_groups: int = typer.Option(10, help="GBA: neuron groups."),
    gba_p_max: Optional[float] = typer.Option(None, help="GBA: highest group target frequency (default: min(0.1, 128 / d_sae))."),
    gba_p_min: Optional[float] = typer.Option(None, help="GBA: lowest group target frequency (default: the highest / 100)."),
    gba_every: Optional[int] = typer.Option(None, help="GBA: steps between bias updates (default: every 25,600 tokens, the paper's 50 steps of 512, or 10 / the lowest target if more)."),
    gba_gamma: float = typer.Option(0.01, help="GBA: bias step size."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Steps between checkpoints (default: every 10 minutes of training)."),
    progress: bool = typer.Option(True, help="Show the progress bar."),
) -> None:
    """Train a TopK, Mutual Choice or GBA sparse autoencoder on one hook of a store (or of a
    model run on the fly with --model)."""
    from sae.config import TrainConfig
    from sae.fused_trainer import choose_trainer
    from workbench.models.device import check_device

    check_device(device)
    if (store is None) == (model is None):
        raise WorkbenchError("pass --store (train on a capture) or --model (capture and train in one pass), not both or neither")
    if store is not None:
        from workbench import Store
        from workbench.training_data import StoreSource

        source = StoreSource(Store.open(store), hook, chunk_tokens=chunk_tokens, buffer_chunks=buffer_chunks, seed=seed,
                             device=device, resident=resident)
    else:
        from workbench.training_data import live_model_source

        source = live_model_source(model, data, hook, ctx, tokens, chunk_tokens, buffer_chunks, seed, device)
    held = source.describe().get("store_tokens", source.describe().get("tokens"))
    if held and tokens > held:
        print(f"note: {tokens:,} training tokens are {tokens / held:.1f} passes over the {held:,} tokens of the data")
    width = d_sae if d_sae is not None else int(round((expansion if expansion is not None else 8.0) * source.d_in))
    if arch == "gba" and k is not None:
        raise WorkbenchError("--k does not apply to --arch gba (its sparsity comes from the group target frequencies)")
    config = TrainConfig(
        arch=arch, d_in=source.d_in, d_sae=width, k=k, tokens=tokens, batch_size=batch_size, lr=lr, seed=seed,
        device=device, precision=precision, aux=aux, dead_tokens=dead_tokens, gba_groups=gba_groups, gba_p_max=gba_p_max,
        gba_p_min=gba_p_min, gba_every=gba_every, gba_gamma=gba_gamma, checkpoint_every=checkpoint_every,
    )
    trainer_class = choose_trainer(config, step)
    command = ["workbench", *sys.argv[1:]]
    trainer = trainer_class.resume(out, source, config, command) if resume else trainer_class.start(config, source, out, command)
    trainer.fit(progress=progress)
    last = trainer.history[-1] if trainer.history else {}
    print(
        f"saved {out} ({config.arch}, {trainer.step_kind} step, d_in={config.d_in}, d_sae={config.d_sae}, "
        f"{trainer.step * config.batch_size:,} tokens): "
        f"fvu={last.get('fvu', float('nan')):.4f} l0={last.get('l0', float('nan')):.1f} dead={last.get('dead_fraction', float('nan')):.3f}"
    )


def eval_command(
    sae_dir: Path = typer.Argument(..., help="SAE folder (ours or any SAELens topk/jumprelu/standard folder)."),
    store: Path = typer.Option(..., help="Store to evaluate on."),
    hook: Optional[str] = typer.Option(None, help="Hook (default: the SAE's metadata.hook_name)."),
    tokens: Optional[int] = typer.Option(None, help="Evaluate on the first N stored tokens (default: all)."),
    ce_sequences: int = typer.Option(32, help="Context windows for the CE-loss score (0 skips it)."),
    device: str = typer.Option("cpu", help="cpu | cuda."),
    json_out: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
) -> None:
    """FVU, explained variance, L0, dead fraction, log-density histogram and CE-loss score."""
    from workbench.evaluation import evaluate_sae
    from workbench.models.device import check_device

    check_device(device)
    result = evaluate_sae(sae_dir, store, hook=hook, tokens=tokens, ce_sequences=ce_sequences, device=device)
    if json_out:
        print(json.dumps(result, indent=1))
        return
    table = Table(title=f"{sae_dir} on {result['hook']} ({result['tokens']:,} tokens)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("fvu", "explained_variance", "l0", "dead_fraction", "ce_clean", "ce_sae", "ce_zero", "ce_score"):
        if key in result:
            table.add_row(key, f"{result[key]:.4f}")
    if "ce_skipped" in result:
        table.add_row("ce_score", f"skipped: {result['ce_skipped']}")
    hist = result["log_density_histogram"]
    bins = ", ".join(f"[{a:g},{b:g}): {c}" for a, b, c in zip(hist["edges_log10"], hist["edges_log10"][1:], hist["counts"]))
    table.add_row("log10 density histogram", f"{bins}; dead: {hist['dead']}")
    Console().print(table)
