"""`workbench links --store S [--sae NAME ...]`: link an SAE's features to the store's phenomena."""

from __future__ import annotations

import typer

from workbench.errors import WorkbenchError
from workbench.store.reader import Store


def links_command(
    store: str = typer.Option(..., "--store", help="store with a feature pass (`workbench features`) and probe rows"),
    sae: list[str] = typer.Option([], "--sae", help="name of an SAE in the store (default: every SAE passed over it)"),
) -> None:
    """Join SAE features to experts, sinks, massive activations and MLP neurons; write link tables."""
    from workbench.analysis.feature_page import list_saes  # torch and the model load only here
    from workbench.analysis.links import run_links, summary_table
    from workbench.models.registry import load_model

    opened = Store.open(store)
    known = list_saes(opened)["name"].tolist()
    names = sae or known
    if not names:
        raise WorkbenchError(f"store {opened.root} has no feature pass; run `workbench features SAE_DIR --store {opened.root}`")
    for name in names:
        if name not in known:
            raise WorkbenchError(f"store {opened.root} has no SAE '{name}' (it has: {', '.join(known) or 'none'})")
    try:
        handle, why = load_model(opened.model_name), ""
    except (WorkbenchError, OSError, ValueError) as err:
        handle, why = None, str(err)
    if handle is None:
        print(f"neuron links skipped: {why}")
    for name in names:
        report = run_links(opened, name, handle)
        note = f"; neuron links: none ({report.neuron_note})" if report.neuron_note else f", {report.neuron_rows:,} neuron rows"
        print(
            f"{name}: {report.sink_tokens:,} sink tokens, {report.massive_tokens:,} massive-activation tokens, "
            f"{report.expert_rows:,} expert rows, {report.phenomenon_rows:,} phenomenon rows{note} -> table {summary_table(name)} ..."
        )
