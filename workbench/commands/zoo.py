"""`workbench zoo list` and `workbench zoo train NAME`: the built-in models and how they are made."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from workbench.errors import WorkbenchError
from workbench.models.zoo import ZOO, ZOO_DATA, is_shipped, training_record, zoo_dir, zoo_spec

zoo_app = typer.Typer(help="The built-in zoo: tiny models trained on the Python standard library.", no_args_is_help=True)


@zoo_app.command("list")
def list_command() -> None:
    """Print each zoo model: shape, whether its weights are shipped, its held-out loss, and the zoo folder."""
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for column in ("name", "layers", "d_model", "experts", "shipped", "held-out loss", "unigram"):
        table.add_column(column, no_wrap=True)
    table.add_column("about")
    for name, spec in sorted(ZOO.items()):
        record = training_record(name) or {}
        experts = f"{spec.num_experts} (top-{spec.experts_per_token})" if spec.num_experts else "-"
        loss = record.get("heldout_loss")
        unigram = record.get("heldout_unigram_entropy")
        table.add_row(
            name,
            str(spec.n_layers),
            str(spec.d_model),
            experts,
            "yes" if is_shipped(name) else "no",
            f"{loss:.3f}" if loss is not None else "-",
            f"{unigram:.3f}" if unigram is not None else "-",
            spec.summary,
        )
    console = Console()
    console.print(table)
    console.print(f"zoo folder: {ZOO_DATA}", soft_wrap=True)


@zoo_app.command("train")
def train_command(
    name: str = typer.Argument(..., help="zoo model to train (see `workbench zoo list`)"),
    minutes: Optional[float] = typer.Option(
        None, help="time budget in minutes: fewer steps if the recipe would not fit, set from the measured speed"
    ),
    steps: Optional[int] = typer.Option(None, help="optimizer steps (default: the recipe's; --minutes can only lower it)"),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when available)"),
    out: Optional[Path] = typer.Option(
        None, help="folder to write (default: NAME in the zoo folder `workbench zoo list` shows, replaced only at the end)"
    ),
) -> None:
    """Train the tokenizer and the model on the builtin corpus and write weights + training.json."""
    import torch

    from workbench.models.zoo_training import train_zoo

    zoo_spec(name)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise WorkbenchError(f"unknown --device '{device}'; use cpu or cuda")
    record = train_zoo(name, device=device, steps=steps, minutes=minutes, out=out)
    folder = out or zoo_dir(name)
    typer.echo(
        f"{name}: {record['steps']} steps, {record['tokens_seen']:,} tokens, held-out loss "
        f"{record['heldout_loss']:.3f} nats (unigram {record['heldout_unigram_entropy']:.3f}), "
        f"Sink_1 {record['phenomena']['sink_rate_eps_0.3']}% -> {folder}"
    )
