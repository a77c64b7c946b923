"""`workbench capture` and `workbench info`: fill a store, and say what a store holds."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from workbench.capture.ranks import capture_ranks
from workbench.capture.runner import CaptureSettings, run_capture
from workbench.store.layout import activation_view
from workbench.store.reader import Store


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def capture_command(
    model: str = typer.Option(..., "--model", help="zoo name (tiny-relu, tiny-moe), all-MiniLM-L6-v2, a local HF folder, or a TransformerLens name"),
    data: str = typer.Option("builtin", "--data", help="a text file or folder, a JSONL file with a 'text' field, `builtin` or `builtin-english`"),
    hooks: str = typer.Option("", "--hooks", help="comma-separated TransformerLens hook names or globs, e.g. blocks.2.hook_resid_post"),
    tokens: int = typer.Option(100_000, "--tokens", help="tokens to store, exactly"),
    ctx: int = typer.Option(128, "--ctx", help="context length of each window, special tokens included"),
    batch_size: int = typer.Option(32, "--batch-size", help="windows per forward pass"),
    store: str = typer.Option(..., "--store", help="store folder (created if missing; resumed if it holds this capture)"),
    probes: str = typer.Option("", "--probes", help="per-batch reductions: lazy,experts,sinks,routing or all"),
    dtype: str = typer.Option("auto", "--dtype", help="stored precision of activations: float32, float16, bfloat16, or auto "
                              "(bfloat16 for a model that runs in bf16, else float32)"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
) -> None:
    """Run the model over the data and record tokens, activations and probes into a store.
    Under torchrun (`torchrun --nproc_per_node N -m workbench.cli capture ...`) the ranks
    capture disjoint batches of the one store (workbench.capture.ranks)."""
    with capture_ranks() as ranks:
        settings = CaptureSettings(
            model=model, data=data, hooks=_split(hooks), tokens=tokens, ctx=ctx, batch_size=batch_size,
            store=store, dtype=dtype, probes=_split(probes), device=ranks.device(device),
        )
        report = run_capture(settings, ranks=ranks)
    if ranks.rank:
        return
    rate = report.new_tokens / report.seconds if report.seconds > 0 else 0.0
    resumed = f", resumed after {report.resumed_batches} stored batches" if report.resumed_batches else ""
    print(f"stored {report.tokens} tokens in {report.store} ({report.new_tokens} new at {rate:,.0f} tok/s{resumed})")
    if report.exhausted:
        print(f"warning: the data ran out after {report.tokens} of {tokens} tokens at ctx {ctx}")


def info_command(store: str = typer.Argument(..., help="store folder")) -> None:
    """Say what a store holds: model, hooks, token counts, tables and SQL views."""
    info = Store.open(store).info()
    console = Console()
    model = info["model"]
    if not model:
        console.print(f"[bold]{info['path']}[/bold]: being created (its capture has not yet written store.json)")
        return
    console.print(f"[bold]{info['path']}[/bold]: model {model['name']} ({model['kind']}, {model['n_layers']} layers, "
                  f"d_model {model['d_model']}, weights {model['fingerprint']})")
    done = "complete" if info["tokens"] == info["tokens_requested"] else f"of {info['tokens_requested']} requested"
    console.print(f"tokens: {info['tokens']:,} ({done}) in {info['batches']} batches, ctx {info['ctx']}, data {info['data']}")
    table = Table("view", "holds", title="SQL views (Store.open(path).sql(...))")
    table.add_row("tokens", "token_index, seq, pos, doc, token_id, token")
    for hook, meta in info["hooks"].items():
        table.add_row(activation_view(hook), f"{hook}: token_index, act {meta['dtype']}{meta['shape']}")
    for name in info["probe_tables"]:
        table.add_row(name, "probe rows, one set per batch")
    for name in info["tables"]:
        table.add_row(name, "derived table")
    console.print(table)


def hooks_command(
    model: str = typer.Option(..., "--model", help="any model `capture` takes"),
    pattern: str = typer.Argument("*", help="glob to filter hook names, e.g. 'blocks.0.*'"),
) -> None:
    """List a model's TransformerLens hook names (what --hooks takes)."""
    import fnmatch

    from workbench.models.registry import load_model

    for name in load_model(model).hook_names():
        if fnmatch.fnmatchcase(name, pattern):
            print(name)
