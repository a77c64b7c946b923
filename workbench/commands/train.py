"""`workbench train` (an SAE on one hook of a store) and `workbench eval` (its quality).

`--arch` takes the training rules sae.registry holds, and each rule's own settings are
flags of their own (--k, --gba-every, ...), made from the rules' RuleConfig fields when the
CLI attaches the command (with_rule_options), so a registered rule needs no change here.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import sys
import typing
from collections.abc import Callable
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from sae.registry import TrainingRule, rule_names, rule_settings, training_rule
from workbench.errors import WorkbenchError
from workbench.held_out import HELD_OUT_FRACTION, HELD_OUT_MAX_TOKENS


def flag(name: str) -> str:
    """The command-line flag of a rule setting: gba_every -> --gba-every."""
    return "--" + name.replace("_", "-")


def _rule_option(name: str, owners: list[tuple[TrainingRule, Field]]) -> inspect.Parameter:
    """The option of one rule setting, shared by the rules that have it: default None (the
    rule's own default), its type and help from each rule's dataclass field."""
    hint = typing.get_type_hints(owners[0][0].config)[name]
    value_type = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
    helps: dict[str, list[str]] = {}
    for owner, f in owners:
        text = f.metadata.get("help", "")
        if f.default is not MISSING and f.default is not None:
            text += f" Default {f.default}."
        helps.setdefault(text, []).append(owner.name)
    text = " ".join(f"{', '.join(names)}: {text}" for text, names in helps.items())
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[value_type],
                             default=typer.Option(None, flag(name), help=text))


def with_rule_options(command: Callable[..., None]) -> Callable[..., None]:
    """command (whose **rule_options collects them) as typer sees it with one option per
    setting of the rules registered now."""

    def run(**options: Any) -> None:
        command(**options)

    hints = typing.get_type_hints(command)  # the module's annotations are strings (postponed)
    params = [p.replace(annotation=hints[p.name]) for p in inspect.signature(command).parameters.values()
              if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params += [_rule_option(name, owners) for name, owners in rule_settings().items()]
    run.__signature__ = inspect.Signature(params)
    run.__name__, run.__doc__ = command.__name__, command.__doc__
    return run


def rule_flags(arch: str, given: dict[str, Any]) -> dict[str, Any]:
    """The rule settings given on the command line (not None), after refusing any that
    --arch's rule does not have."""
    own = {f.name for f in fields(training_rule(arch).config)}
    settings = {name: value for name, value in given.items() if value is not None}
    for name in settings:
        if name not in own:
            theirs = ", ".join(flag(n) for n in sorted(own)) or "none"
            raise WorkbenchError(f"{flag(name)} does not apply to --arch {arch} (its own flags: {theirs})")
    return settings


def train_command(
    store: Optional[Path] = typer.Option(None, help="Capture store folder to read activations from (or --model)."),
    hook: str = typer.Option(
        ..., help="Hook to train on, e.g. blocks.2.hook_resid_post (stored, or of --model); a transcoder's input, e.g. blocks.2.ln2.hook_normalized."
    ),
    target_hook: Optional[str] = typer.Option(
        None,
        help="Train a transcoder: predict this stored hook (e.g. blocks.2.hook_mlp_out) "
        "from --hook's activations of the same tokens; the loss is the FVU of the target.",
    ),
    skip: bool = typer.Option(False, "--skip", help="With --target-hook: a skip transcoder (adds a learned linear term W_skip x)."),
    model: Optional[str] = typer.Option(
        None, help="Train with no store: run this model (any `capture` takes) over --data and train on its activations as they come."
    ),
    data: str = typer.Option("builtin", help="With --model: the text (as `capture --data` takes)."),
    ctx: int = typer.Option(128, help="With --model: context length of each window."),
    arch: str = typer.Option("topk", help=" | ".join(rule_names()) + "."),
    expansion: Optional[float] = typer.Option(None, help="d_sae = expansion * d_in (default 8 unless --d-sae)."),
    d_sae: Optional[int] = typer.Option(None, "--d-sae", help="Number of SAE features (overrides --expansion)."),
    tokens: int = typer.Option(1_000_000, help="Training tokens (steps = tokens // batch-size); the store is cycled."),
    batch_size: int = typer.Option(4096, help="Tokens per step."),
    lr: Optional[float] = typer.Option(None, help="Adam learning rate (default 2e-4 / sqrt(d_sae / 2^14))."),
    out: Path = typer.Option(..., help="Output folder: SAELens cfg.json + sae_weights.safetensors, training.json, checkpoint.pt."),
    device: str = typer.Option("cpu", help="cpu | cuda."),
    precision: str = typer.Option("bf16", help="bf16 | fp32: the encoder product's precision on CUDA (CPU is always fp32)."),
    step: str = typer.Option(
        "auto",
        help="auto | fused | autograd: fused = the TopK step as Triton kernels with no autograd "
        "(CUDA or --backend triton, --arch topk, --aux none or auxk); auto = fused where it can run, else autograd. "
        "Under torchrun both run data parallel over the ranks.",
    ),
    backend: Optional[str] = typer.Option(
        None,
        help="triton | torch: the kernels' implementation (default: triton on CUDA, "
        "torch on the CPU; triton on the CPU runs only under TRITON_INTERPRET=1, for tests).",
    ),
    shard_latents: bool = typer.Option(
        False,
        "--shard-latents",
        help="Under torchrun: split the SAE's features over the ranks (each holds d_sae / N of them and their Adam "
        "state) instead of the batch, for an SAE wider than one GPU; --arch topk, --aux none; checkpoints every "
        "--checkpoint-every steps (default 1000).",
    ),
    resume: bool = typer.Option(False, help="Continue the run in --out from its checkpoint."),
    seed: int = typer.Option(0, help="Seed for initialisation and data order."),
    aux: Optional[str] = typer.Option(
        None, help="auxk | aux-zipf | none (default: " + ", ".join(f"{training_rule(name).default_aux} for {name}" for name in rule_names()) + ")."
    ),
    dead_tokens: int = typer.Option(1_000_000, help="A feature is dead after this many tokens without firing."),
    chunk_tokens: int = typer.Option(65536, help="Tokens per chunk read from the store (with --model: run through it at once)."),
    buffer_chunks: int = typer.Option(4, help="Chunks shuffled together (memory: chunk-tokens * buffer-chunks * d_in values)."),
    resident: Optional[bool] = typer.Option(
        None,
        "--resident/--stream",
        help="Hold the hook's stored activations on --device (default: when they take at most half its free memory) or stream them.",
    ),
    checkpoint_every: Optional[int] = typer.Option(None, help="Steps between checkpoints (default: every 10 minutes of training)."),
    held_out: Optional[float] = typer.Option(
        None,
        help=f"Share of the store's context windows (the last ones) kept out of "
        f"training for `workbench eval` (default {HELD_OUT_FRACTION:g}, at most "
        f"{HELD_OUT_MAX_TOKENS:,} tokens; 0 holds none out; --resume keeps the run's own).",
    ),
    progress: bool = typer.Option(True, help="Show the progress bar."),
    release: Optional[str] = typer.Option(
        None,
        help="List the finished SAE in this local release (as RELEASE/<out folder name>), "
        "so load_sae('RELEASE/ID') finds it offline (workbench/releases.py).",
    ),
    **rule_options: Any,
) -> None:
    """Train a sparse autoencoder (TopK, Mutual Choice, GBA: any registered rule, --arch) on one
    hook of a store (or of a model run on the fly with --model), or with --target-hook a
    transcoder from one stored hook to another (--skip: a skip transcoder). Under torchrun
    (`torchrun --nproc_per_node N -m workbench.cli train ...`) the ranks train data parallel,
    each on its GPU, and rank 0 writes --out (sae.step_choice says which step)."""
    from sae.config import TrainConfig
    from sae.trainer import Trainer
    from workbench.models.device import check_device

    check_device(device)
    settings = rule_flags(arch, rule_options)
    if release is not None:
        from workbench.releases import check_release_name

        check_release_name(release)
    if (store is None) == (model is None):
        raise WorkbenchError("pass --store (train on a capture) or --model (capture and train in one pass), not both or neither")
    if skip and target_hook is None:
        raise WorkbenchError("--skip is a skip transcoder: pass --target-hook too")
    if target_hook is not None and model is not None:
        raise WorkbenchError("--target-hook trains from a store: capture both hooks with `workbench capture --hooks A,B`, then pass --store")
    from sae.distributed import launched_by_torchrun, process_group

    if shard_latents:
        if not launched_by_torchrun():
            raise WorkbenchError("--shard-latents splits the features over torchrun's processes: "
                                 "launch with torchrun --nproc_per_node N -m workbench.cli train ...")
        if step != "auto":
            raise WorkbenchError(f"--shard-latents is its own step: drop --step {step}")
        step, checkpoint_every = "shard-latents", checkpoint_every or 1000
    group = process_group(device) if launched_by_torchrun() else contextlib.nullcontext((0, device))
    with group as (rank, device):
        if store is not None:
            from workbench import Store
            from workbench.held_out import training_split
            from workbench.training_data import StoreSource

            opened = Store.open(store)
            split = training_split(opened, out, resume, held_out)
            source = StoreSource(
                opened,
                hook,
                chunk_tokens=chunk_tokens,
                buffer_chunks=buffer_chunks,
                seed=seed,
                device=device,
                resident=resident,
                held_out=split,
                target_hook=target_hook,
            )
            if split is not None and split.tokens and rank == 0:
                print(f"held out for `workbench eval`: the last {split.windows:,} windows, token_index [{split.start:,}, {split.stop:,})")
        else:
            if held_out:
                raise WorkbenchError("--held-out applies to --store: live-model training (--model) has no store to hold tokens out of")
            from workbench.training_data import live_model_source

            source = live_model_source(model, data, hook, ctx, tokens, chunk_tokens, buffer_chunks, seed, device)
        held = source.describe().get("store_tokens", source.describe().get("tokens"))
        if held and tokens > held and rank == 0:
            print(f"note: {tokens:,} training tokens are {tokens / held:.1f} passes over the {held:,} tokens of the data")
        width = d_sae if d_sae is not None else int(round((expansion if expansion is not None else 8.0) * source.d_in))
        config = TrainConfig(
            arch=arch,
            d_in=source.d_in,
            d_sae=width,
            d_out=source.d_out,
            skip=skip,
            tokens=tokens,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            device=device,
            precision=precision,
            aux=aux,
            dead_tokens=dead_tokens,
            checkpoint_every=checkpoint_every,
            **settings,
        )
        command = ["workbench", *sys.argv[1:]]
        if resume:
            trainer = Trainer.resume(out, source, config, command, step=step, backend=backend)
        else:
            trainer = Trainer.start(config, source, out, command, step=step, backend=backend)
        trainer.writer = rank == 0  # under torchrun rank 0 alone writes the run
        trainer.fit(progress=progress and rank == 0)
        last = trainer.history[-1] if trainer.history else {}
        steps, step_kind = trainer.step, trainer.step_kind
        del trainer  # a data-parallel step's DDP reducer, before the process group goes
        if rank:
            return
        if release is not None and steps >= config.steps:
            from workbench.analysis.features import sae_name
            from workbench.releases import register_release

            listed = register_release(release, sae_name(out), out, str(source.describe().get("model_name") or "unknown"),
                                      l0=last.get("l0"), variance_explained=1 - last["fvu"] if "fvu" in last else None)  # fmt: skip
            print(f"listed as {release}/{sae_name(out)} in {listed}")
        kind = "" if config.d_out is None else f"{'skip ' if config.skip else ''}transcoder {hook} -> {target_hook}, "
        print(
            f"saved {out} ({kind}{config.arch}, {step_kind} step, d_in={config.d_in}, d_sae={config.d_sae}, "
            f"{steps * config.batch_size:,} tokens): "
            f"fvu={last.get('fvu', float('nan')):.4f} l0={last.get('l0', float('nan')):.1f} dead={last.get('dead_fraction', float('nan')):.3f}"
        )


def eval_command(
    sae_dir: Path = typer.Argument(..., help="SAE folder (ours or any SAELens topk/jumprelu/standard folder)."),
    store: Path = typer.Option(..., help="Store to evaluate on."),
    hook: Optional[str] = typer.Option(None, help="Hook (default: the SAE's metadata.hook_name)."),
    split: str = typer.Option(
        "held-out",
        help="held-out: the tokens the SAE's run held out of training (all stored "
        "tokens, with a note, where it recorded none); all: every stored token.",
    ),
    tokens: Optional[int] = typer.Option(None, help="Evaluate on the first N tokens of the split (default: all of them)."),
    ce_sequences: int = typer.Option(32, help="Context windows (of the split) for the CE-loss score (0 skips it)."),
    device: str = typer.Option("cpu", help="cpu | cuda."),
    json_out: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
) -> None:
    """FVU, explained variance, L0, dead fraction, log-density histogram and loss recovered
    (against mean and zero ablation), on the SAE's held-out tokens unless --split all."""
    from workbench.evaluation import evaluate_sae
    from workbench.models.device import check_device

    check_device(device)
    result = evaluate_sae(sae_dir, store, hook=hook, tokens=tokens, ce_sequences=ce_sequences, device=device, split=split)
    if json_out:
        print(json.dumps(result, indent=1))
        return
    if result["split_note"]:
        print(f"note: {result['split_note']}")
    first = result["split_tokens"][0]
    on = result["hook"] + (f" -> {result['target_hook']}" if "target_hook" in result else "")
    table = Table(
        title=f"{sae_dir} on {on}: {result['split']} tokens, token_index [{first:,}, {first + result['tokens']:,}) ({result['tokens']:,} tokens)"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in (
        "fvu",
        "explained_variance",
        "l0",
        "dead_fraction",
        "ce_clean",
        "ce_sae",
        "ce_mean",
        "ce_zero",
        "loss_recovered",
        "loss_recovered_zero",
    ):
        if key in result:
            table.add_row(key, f"{result[key]:.4f}")
    if "ce_skipped" in result:
        table.add_row("loss_recovered", f"skipped: {result['ce_skipped']}")
    hist = result["log_density_histogram"]
    bins = ", ".join(f"[{a:g},{b:g}): {c}" for a, b, c in zip(hist["edges_log10"], hist["edges_log10"][1:], hist["counts"]))
    table.add_row("log10 density histogram", f"{bins}; dead: {hist['dead']}")
    Console().print(table)
