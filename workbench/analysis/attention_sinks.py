"""Attention sinks from the `sinks` probe: alpha per key position, Sink_1, hidden sinks.

alpha_k of head (l, h) is the mean attention the queries able to see key position k give it
(sum of attention over those queries / their number, exact over batches); positions are
0-indexed here, so the paper's alpha_1 is pos 0. Sink_1 = 100 * share of (sample, layer,
head) whose first-position alpha exceeds eps (0.3 in Gu et al. 2024). Special tokens
([CLS], [SEP], <bos>...) get alpha per occurrence (sink_special_alpha), averaged here per
(token, layer, head); stores captured before those rows existed simply lack them.
"""

from __future__ import annotations

import pandas as pd

from workbench.capture.probes.registry import require_probe
from workbench.errors import WorkbenchError
from workbench.store.reader import Store
from workbench.store.table_group import TableUnit

SINK_EPS = 0.3


def key_importance(store: Store) -> pd.DataFrame:
    """layer, head, pos, alpha: mean attention received per key position over the capture."""
    require_probe(store, "sinks")
    return store.df(
        """
        SELECT layer, head, pos, sum(attention_sum) / sum(n_queries) AS alpha
        FROM sink_attention WHERE n_queries > 0 GROUP BY layer, head, pos ORDER BY layer, head, pos
        """
    )


def first_position_grid(store: Store) -> pd.DataFrame:
    """The layer x head grid of alpha at the first position (rows layers, columns heads)."""
    alpha = key_importance(store)
    first = alpha[alpha["pos"] == 0]
    return first.pivot(index="layer", columns="head", values="alpha")


def sink_rate(store: Store, eps: float = SINK_EPS) -> pd.DataFrame:
    """layer, sink_rate (% of (sample, head) with alpha_1 > eps), samples; plus an 'all' row."""
    require_probe(store, "sinks")
    per_layer = store.df(
        """
        SELECT layer::VARCHAR AS layer, 100.0 * avg((alpha_1 > ?)::INT) AS sink_rate, count(*) AS samples
        FROM sink_first_alpha GROUP BY layer ORDER BY layer::INT
        """,
        [eps],
    )
    overall = store.df("SELECT 'all' AS layer, 100.0 * avg((alpha_1 > ?)::INT) AS sink_rate, count(*) AS samples FROM sink_first_alpha", [eps])
    return pd.concat([per_layer, overall], ignore_index=True)


def sink_heads(store: Store, eps: float = SINK_EPS) -> pd.DataFrame:
    """Heads whose mean first-position alpha exceeds eps: layer, head, alpha_1."""
    alpha = key_importance(store)
    first = alpha[(alpha["pos"] == 0) & (alpha["alpha"] > eps)]
    return first.rename(columns={"alpha": "alpha_1"})[["layer", "head", "alpha_1"]].reset_index(drop=True)


def hidden_sinks(store: Store) -> pd.DataFrame:
    """token, occurrences, heads, mean_alpha: later positions acting as sinks, by token string."""
    require_probe(store, "sinks")
    return store.df(
        """
        SELECT t.token, count(*) AS occurrences, count(DISTINCT (h.layer, h.head)) AS heads, avg(h.alpha) AS mean_alpha
        FROM sink_hidden AS h JOIN tokens AS t USING (token_index)
        GROUP BY t.token ORDER BY occurrences DESC, t.token
        """
    )


def hidden_sinks_by_head(store: Store) -> pd.DataFrame:
    """layer, head, token, occurrences, mean_alpha: which tokens each head treats as a hidden sink."""
    require_probe(store, "sinks")
    return store.df(
        """
        SELECT h.layer, h.head, t.token, count(*) AS occurrences, avg(h.alpha) AS mean_alpha
        FROM sink_hidden AS h JOIN tokens AS t USING (token_index)
        GROUP BY h.layer, h.head, t.token ORDER BY h.layer, h.head, occurrences DESC
        """
    )


def has_special_rows(store: Store) -> bool:
    """Whether the store's sinks probe recorded alpha at special-token positions (older stores did not)."""
    return "sink_special_alpha" in store.info()["probe_tables"]


def special_token_alpha(store: Store) -> pd.DataFrame:
    """special, layer, head, alpha, occurrences: mean alpha of each special token per head,
    over every (sample, position) where the token sat."""
    require_probe(store, "sinks")
    if not has_special_rows(store):
        raise WorkbenchError(f"store {store.root} has no special-token alpha rows: recapture with --probes sinks")
    return store.df(
        """
        SELECT t.token AS special, s.layer, s.head, avg(s.alpha) AS alpha, count(*) AS occurrences
        FROM sink_special_alpha AS s JOIN tokens AS t USING (token_index)
        GROUP BY t.token, s.layer, s.head ORDER BY special, s.layer, s.head
        """
    )


def analyze_sinks(store: Store, eps: float = SINK_EPS) -> dict[str, pd.DataFrame]:
    """Sink_1 per layer, the alpha_1 grid, the hidden-sink tokens and (when recorded) each special
    token's alpha per head; persisted as sink_* tables."""
    rate = sink_rate(store, eps)
    alpha = key_importance(store)
    first = alpha[alpha["pos"] == 0].rename(columns={"alpha": "alpha_1"}).drop(columns="pos").reset_index(drop=True)
    hidden = hidden_sinks(store)
    result = {"rate": rate, "alpha_first": first, "heads": first[first["alpha_1"] > eps].reset_index(drop=True), "hidden": hidden}
    if has_special_rows(store):
        result["special"] = special_token_alpha(store)
    with TableUnit(store.root, "analysis_sinks") as unit:  # published together
        unit.write_table("sink_rate_by_layer", rate)
        unit.write_table("sink_alpha_first", first)
        unit.write_table("sink_hidden_tokens", hidden)
        if "special" in result:
            unit.write_table("sink_special_alpha_mean", result["special"])
    return result
