"""Lazy neurons from the `lazy` probe's counts: % active per layer, neuron frequencies, dead and dense lists.

% active for (layer, rule) = 100 * sum fired / (tokens * d_mlp), the mean over tokens of
the per-token active fraction (Li et al. 2022). A neuron is dead when it never fired over
the whole capture, dense when it fired on at least `dense_frequency` of the tokens.

Expert neurons of mixture-of-experts layers (lazy_expert_counts) are counted over the tokens
routed to their expert: frequency = fired / routed tokens. A neuron whose expert received no
token is `unrouted` (nothing is known about it), never dead; stores captured before experts
were counted simply have no expert rows.
"""

from __future__ import annotations

import pandas as pd

from workbench.capture.probes.registry import require_probe
from workbench.errors import WorkbenchError
from workbench.store.reader import Store
from workbench.store.table_group import TableUnit

DENSE_FREQUENCY = 0.99


def active_percent_by_layer(store: Store) -> pd.DataFrame:
    """layer, rule, pct_active, tokens: mean % of MLP neurons active per token."""
    require_probe(store, "lazy")
    return store.df(
        """
        SELECT layer, rule, 100.0 * sum(fired) / sum(tokens) AS pct_active,
               sum(tokens) / count(DISTINCT neuron) AS tokens
        FROM lazy_neuron_counts GROUP BY layer, rule ORDER BY rule, layer
        """
    )


def neuron_frequencies(store: Store) -> pd.DataFrame:
    """layer, rule, neuron, fired, tokens, frequency for every neuron over the whole capture."""
    require_probe(store, "lazy")
    return store.df(
        """
        SELECT layer, rule, neuron, sum(fired) AS fired, sum(tokens) AS tokens,
               sum(fired)::DOUBLE / sum(tokens) AS frequency
        FROM lazy_neuron_counts GROUP BY layer, rule, neuron ORDER BY rule, layer, neuron
        """
    )


def has_expert_rows(store: Store) -> bool:
    """Whether the store's lazy probe counted MoE expert neurons (stores of dense models, or older stores, did not)."""
    return "lazy_expert_counts" in store.info()["probe_tables"]


def expert_neuron_frequencies(store: Store, min_frequency: float = DENSE_FREQUENCY) -> pd.DataFrame:
    """layer, expert, rule, neuron, fired, tokens (routed to the expert), frequency (NaN when
    unrouted) and state: unrouted (its expert got no token), dead (never fired on a routed
    token), dense (fired on at least min_frequency of them) or live."""
    require_probe(store, "lazy")
    if not has_expert_rows(store):
        raise WorkbenchError(f"store {store.root} has no expert rows: capture a mixture-of-experts model with --probes lazy")
    return store.df(
        """
        SELECT layer, expert, rule, neuron, sum(fired) AS fired, sum(tokens) AS tokens,
               CASE WHEN sum(tokens) > 0 THEN sum(fired)::DOUBLE / sum(tokens) END AS frequency,
               CASE WHEN sum(tokens) = 0 THEN 'unrouted' WHEN sum(fired) = 0 THEN 'dead'
                    WHEN sum(fired) >= ? * sum(tokens) THEN 'dense' ELSE 'live' END AS state
        FROM lazy_expert_counts GROUP BY layer, expert, rule, neuron ORDER BY rule, layer, expert, neuron
        """,
        [min_frequency],
    )


def expert_summary(frequencies: pd.DataFrame) -> pd.DataFrame:
    """Per (layer, expert, rule): routed tokens, % of its neurons active per routed token, and
    how many of its neurons are dead, dense or unrouted (from expert_neuron_frequencies)."""
    frame = frequencies.assign(
        dead=frequencies["state"] == "dead", dense=frequencies["state"] == "dense", unrouted=frequencies["state"] == "unrouted"
    )
    summary = frame.groupby(["layer", "expert", "rule"], as_index=False).agg(
        routed=("tokens", "max"), fired=("fired", "sum"), neurons=("neuron", "size"),
        dead=("dead", "sum"), dense=("dense", "sum"), unrouted=("unrouted", "sum"),
    )  # fmt: skip
    summary["pct_active"] = 100.0 * summary["fired"] / (summary["routed"] * summary["neurons"]).where(summary["routed"] > 0)
    return summary.drop(columns="fired")


def dead_neurons(frequencies: pd.DataFrame) -> pd.DataFrame:
    """Neurons that never fired (per rule)."""
    return frequencies[frequencies["fired"] == 0].reset_index(drop=True)


def dense_neurons(frequencies: pd.DataFrame, min_frequency: float = DENSE_FREQUENCY) -> pd.DataFrame:
    """Neurons that fired on at least min_frequency of the tokens (per rule)."""
    return frequencies[frequencies["frequency"] >= min_frequency].reset_index(drop=True)


def token_activity(store: Store, rule: str) -> pd.DataFrame:
    """token_index, layer, active_frac: the layer x token heatmap of active ratios."""
    require_probe(store, "lazy")
    return store.df(
        "SELECT token_index, layer, active_frac FROM lazy_token_activity WHERE rule = ? ORDER BY token_index, layer",
        [rule],
    )


def neuron_top_tokens(store: Store, layer: int, neuron: int, n: int = 10) -> pd.DataFrame:
    """The tokens (with position and string) on which a neuron reached its largest values."""
    require_probe(store, "lazy")
    return store.df(
        """
        SELECT top.value, top.token_index, t.seq, t.pos, t.token
        FROM lazy_neuron_top AS top JOIN tokens AS t USING (token_index)
        WHERE top.layer = ? AND top.neuron = ? ORDER BY top.value DESC LIMIT ?
        """,
        [layer, neuron, n],
    )


def analyze_lazy(store: Store, min_frequency: float = DENSE_FREQUENCY) -> dict[str, pd.DataFrame]:
    """Run the lazy-neuron analysis and persist lazy_layer_summary and lazy_neuron_frequency
    (and, for MoE models, lazy_expert_summary and lazy_expert_frequency) as one table group."""
    by_layer = active_percent_by_layer(store)
    frequencies = neuron_frequencies(store)
    dead, dense = dead_neurons(frequencies), dense_neurons(frequencies, min_frequency)
    counts = frequencies.assign(dead=frequencies["fired"] == 0, dense=frequencies["frequency"] >= min_frequency)
    summary = by_layer.merge(
        counts.groupby(["layer", "rule"], as_index=False).agg(
            neurons=("neuron", "size"), dead=("dead", "sum"), dense=("dense", "sum")
        ),
        on=["layer", "rule"],
    )
    result = {"by_layer": summary, "frequencies": frequencies, "dead": dead, "dense": dense}
    if has_expert_rows(store):
        result["expert_frequencies"] = expert_neuron_frequencies(store, min_frequency)
        result["experts"] = expert_summary(result["expert_frequencies"])
    with TableUnit(store.root, "analysis_lazy") as unit:  # published together
        unit.write_table("lazy_layer_summary", summary)
        unit.write_table("lazy_neuron_frequency", counts)
        if "experts" in result:
            unit.write_table("lazy_expert_summary", result["experts"])
            unit.write_table("lazy_expert_frequency", result["expert_frequencies"])
    return result
