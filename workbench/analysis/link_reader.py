"""What the app's pages read of the link tables (workbench/analysis/links.py): one feature's
links, the features on one kind of phenomenon, and the feature a page should open on.

Every query binds its inputs as parameters and quotes table names as identifiers.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from workbench.analysis.features import features_table, stats_table
from workbench.analysis.links import LINKS_TABLE, experts_table, neurons_table, phenomena_table, stored_files, summary_table
from workbench.store.reader import Store, sql_identifier

#: A feature the page opens on fires at least this often and has most of its top examples
#: after position 0 (a feature of the first token says little about the text).
MIN_FIRES, MAX_POS0_SHARE = 20, 0.5


def links_state(store: Store, name: str) -> str:
    """"current", "stale" (computed from an earlier feature pass of this SAE) or "missing"."""
    views = store.views()
    if LINKS_TABLE not in views or summary_table(name) not in views:
        return "missing"
    row = store.df(f"SELECT features_files FROM {LINKS_TABLE} WHERE name = ?", [name])
    if not len(row):
        return "missing"
    return "current" if row["features_files"].iloc[0] == stored_files(store, features_table(name)) else "stale"


@dataclass
class FeatureLinks:
    """One feature's row of the summary, its experts, its nearest neurons and, when there are
    no neuron rows for the SAE, why."""

    summary: dict
    experts: pd.DataFrame
    neurons: pd.DataFrame
    neuron_note: str


def feature_links(store: Store, name: str, feature: int) -> FeatureLinks:
    """The link rows of one feature (empty frames where a link does not apply to the store)."""
    summary = store.df(f"SELECT * FROM {sql_identifier(summary_table(name))} WHERE feature = ?", [feature])
    experts = store.df(f"SELECT * FROM {sql_identifier(experts_table(name))} WHERE feature = ? ORDER BY layer, expert", [feature])
    neurons = store.df(f"SELECT * FROM {sql_identifier(neurons_table(name))} WHERE feature = ? ORDER BY rank", [feature])
    note = store.df(f"SELECT neuron_note FROM {LINKS_TABLE} WHERE name = ?", [name])["neuron_note"]
    return FeatureLinks(summary.iloc[0].to_dict() if len(summary) else {}, experts, neurons, str(note.iloc[0]) if len(note) else "")


def features_on(store: Store, name: str, kind: str, marked_only: bool = True) -> pd.DataFrame:
    """The top features of every unit of one kind (expert, head, neuron): the marked ones
    (super, sink, dead/dense) only unless marked_only is False."""
    return store.df(
        f"""SELECT * FROM {sql_identifier(phenomena_table(name))}
            WHERE kind = ? AND (marked <> '' OR NOT ?) ORDER BY layer, unit, rank""",
        [kind, marked_only],
    )


def opening_feature(store: Store, name: str) -> int:
    """The feature the page opens on: informative_feature, else (no links yet, or no candidate)
    the live feature of median firing count."""
    best = informative_feature(store, name)
    if best is not None:
        return best
    live = store.df(f"SELECT feature FROM {sql_identifier(stats_table(name))} WHERE count > 0 ORDER BY count, feature")
    return int(live["feature"].iloc[len(live) // 2]) if len(live) else 0


def informative_feature(store: Store, name: str) -> int | None:
    """Among the features firing at least MIN_FIRES times with at most MAX_POS0_SHARE of their
    top examples at position 0, the one whose top tokens are most varied (highest entropy over
    distinct token ids); None without a summary table or a candidate."""
    if summary_table(name) not in store.views():
        return None
    best = store.df(
        f"""SELECT feature FROM {sql_identifier(summary_table(name))}
            WHERE fires >= ? AND top_pos0_share <= ? ORDER BY top_token_entropy DESC, feature LIMIT 1""",
        [MIN_FIRES, MAX_POS0_SHARE],
    )
    return int(best["feature"].iloc[0]) if len(best) else None
