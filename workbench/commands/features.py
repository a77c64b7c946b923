"""`workbench features DIR --store S`: the feature pass of one SAE over a store."""

from __future__ import annotations

import typer

from workbench.analysis.feature_sort import RUN_ROWS
from workbench.store.reader import Store


def features_command(
    sae: str = typer.Argument(..., help="SAE folder (SAELens layout: cfg.json + sae_weights.safetensors)"),
    store: str = typer.Option(..., "--store", help="store holding the SAE's hook"),
    name: str = typer.Option(None, "--name", help="name of the SAE in the store (default: its folder name)"),
    hook: str = typer.Option(None, "--hook", help="hook to encode (default: the SAE's cfg metadata.hook_name)"),
    chunk_tokens: int = typer.Option(16384, "--chunk-tokens", help="tokens encoded at once"),
    corr_tokens: int = typer.Option(100_000, "--corr-tokens", help="tokens used for co-firing correlations"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    sort_rows: int = typer.Option(
        RUN_ROWS, "--sort-rows", help="feature rows sorted in memory at once (about 50 bytes each); more are spilled to disk and merged"
    ),
) -> None:
    """Encode the stored activations with an SAE; write sparse feature activations and stats."""
    from workbench.analysis.features import features_table, run_feature_pass  # torch + SAE code load only here
    from workbench.models.device import check_device

    check_device(device)

    report = run_feature_pass(
        Store.open(store),
        sae,
        name=name,
        hook=hook,
        chunk_tokens=chunk_tokens,
        corr_tokens=corr_tokens,
        device=device,
        sort_rows=sort_rows,
    )
    print(
        f"{report.name} ({report.rule}, d_sae {report.d_sae}) on {report.hook}: {report.tokens:,} tokens, "
        f"{report.rows:,} activations (L0 {report.l0:.1f}), FVU {report.fvu:.4f}, dead {100 * report.dead_fraction:.1f}% "
        f"in {report.seconds:.1f} s -> table {features_table(report.name)}"
    )
