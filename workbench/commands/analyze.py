"""`workbench analyze --store S [lazy|experts|sinks|routing|all]`: run the phenomenon analyses, print summaries."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import typer
from rich.console import Console
from rich.table import Table

from workbench.capture.probes.registry import PROBE_NAMES, PROBE_TABLES, require_probe
from workbench.errors import WorkbenchError
from workbench.store.reader import Store


def _table(title: str, frame: pd.DataFrame, columns: list[str]) -> Table:
    frame = frame.copy()
    if "token" in frame:  # whitespace tokens (newlines, indents) stay visible as escapes
        frame["token"] = frame["token"].map(lambda t: repr(t) if isinstance(t, str) else str(t))
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right" if pd.api.types.is_numeric_dtype(frame[column]) else "left")
    for _, row in frame[columns].iterrows():
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
    return table


def _lazy(store: Store, console: Console) -> None:
    from workbench.analysis.lazy_neurons import analyze_lazy

    result = analyze_lazy(store)
    if not result["by_layer"].empty:
        console.print(_table("Lazy neurons: % of MLP neurons active per token", result["by_layer"],
                             ["rule", "layer", "pct_active", "neurons", "dead", "dense"]))  # fmt: skip
    if "experts" in result:
        per_layer = result["experts"].groupby(["rule", "layer"], as_index=False).agg(
            experts=("expert", "size"), pct_active=("pct_active", "mean"), dead=("dead", "sum"),
            dense=("dense", "sum"), unrouted=("unrouted", "sum"),
        )  # fmt: skip
        console.print(_table("Lazy expert neurons: % active per routed token (mean over experts)", per_layer,
                             ["rule", "layer", "experts", "pct_active", "dead", "dense", "unrouted"]))  # fmt: skip


def _experts(store: Store, console: Console) -> None:
    from workbench.analysis.super_experts import analyze_experts

    result = analyze_experts(store)
    experts = result["experts"].sort_values("a", ascending=False).head(8)
    console.print(_table("Experts: largest max |down-proj output| (super = the 99.5th pct & max/10 rule)", experts,
                         ["layer", "expert", "a", "ratio_to_median", "is_super", "token", "pos", "channel"]))  # fmt: skip
    if result["super"].empty:
        console.print("super experts: none")
    if result["massive"].empty:
        console.print("massive activations: the model exposes no blocks.L.hook_resid_post")
        return
    console.print(_table("Massive activations: residual |h| per layer (mean over samples)", result["massive"],
                         ["layer", "top1", "top2", "top3", "median", "ratio", "top1_channel", "top1_channel_share", "is_massive"]))  # fmt: skip


def _sinks(store: Store, console: Console) -> None:
    from workbench.analysis.attention_sinks import analyze_sinks

    result = analyze_sinks(store)
    console.print(_table("Attention sinks: Sink_1 (% of sample x head with alpha_1 > 0.3)", result["rate"],
                         ["layer", "sink_rate", "samples"]))  # fmt: skip
    grid = result["alpha_first"].pivot(index="layer", columns="head", values="alpha_1")
    grid.columns = [f"h{c}" for c in grid.columns]
    console.print(_table("alpha_1 per layer x head", grid.reset_index(), ["layer", *grid.columns]))
    console.print(_table("Hidden sinks (later positions with alpha > 0.1)", result["hidden"].head(10),
                         ["token", "occurrences", "heads", "mean_alpha"]))  # fmt: skip
    if "special" in result:
        special = (
            result["special"]
            .groupby("special", as_index=False)
            .agg(mean_alpha=("alpha", "mean"), max_alpha=("alpha", "max"), occurrences=("occurrences", "max"))
        )
        console.print(_table("Special tokens: alpha over heads", special, ["special", "mean_alpha", "max_alpha", "occurrences"]))


def _routing(store: Store, console: Console) -> None:
    from workbench.analysis.routing import analyze_routing

    result = analyze_routing(store)
    console.print(_table("Routing: load balance, router entropy, token-ID specialisation", result["summary"],
                         ["layer", "cv", "max_over_mean", "entropy", "router_entropy", "specialisation", "chance"]))  # fmt: skip
    drops = result["drops"].groupby("bucket", as_index=False).agg(pos_from=("pos_from", "first"), pos_to=("pos_to", "first"),
                                                                  drop_ratio=("drop_ratio", "mean"))  # fmt: skip
    console.print(_table("Simulated drops at capacity factor 1.0 (mean over layers)", drops, ["bucket", "pos_from", "pos_to", "drop_ratio"]))


ANALYSES: dict[str, Callable[[Store, Console], None]] = {"lazy": _lazy, "experts": _experts, "sinks": _sinks, "routing": _routing}


def analyze_command(
    which: str = typer.Argument("all", help=f"{'|'.join(PROBE_NAMES)}|all"),
    store: Path = typer.Option(..., "--store", help="a store captured with --probes"),
) -> None:
    """Turn the probes' rows into phenomenon metrics, save them as store tables and print summaries."""
    opened = Store.open(store)
    if which == "all":
        captured = set(opened.info()["probe_tables"])
        names = [n for n in PROBE_NAMES if PROBE_TABLES[n] in captured]
        if not names:
            raise WorkbenchError(f"store {opened.root} has no probe rows: capture with --probes all (or {','.join(PROBE_NAMES)})")
    elif which in ANALYSES:
        require_probe(opened, which)
        names = [which]
    else:
        raise WorkbenchError(f"unknown analysis '{which}'; choose from {', '.join(PROBE_NAMES)} or all")
    console = Console()
    for name in names:
        ANALYSES[name](opened, console)
