"""The data of one SAE feature's page (Neuronpedia-style), read from the feature pass's tables.

One query fetches the feature's rows (feature-sorted Parquet, pruned by row-group stats);
everything else (top examples, interval examples, the activation histogram, context
tokens coloured by activation) is numpy over those rows and the store's token ids, which
TokenText holds in memory once per store. Every query binds its inputs as parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from workbench.analysis.features import (
    SAES_TABLE,
    corr_table,
    features_table,
    stats_table,
)
from workbench.errors import WorkbenchError
from workbench.store.reader import Store, parquet_source, sql_identifier


class TokenText:
    """token_index -> (sequence, token string) for a whole store at 4 bytes a token: the token
    ids as one int32 array, where each sequence starts, and the vocabulary's strings. Only a
    context's few tokens are ever turned into strings, so a store of any size loads without
    holding its text as Python objects."""

    def __init__(self, store: Store) -> None:
        files = store.views().get("tokens", [])
        self.token_id = np.empty(sum(pq.ParquetFile(f).metadata.num_rows for f in files), np.int32)
        starts, previous, at = [], None, 0
        for path in files:  # batch files in token order, each read alone
            table = pq.read_table(path, columns=["seq", "token_id"])
            seq = table["seq"].to_numpy()
            if not len(seq):
                continue
            self.token_id[at : at + len(seq)] = table["token_id"].to_numpy()
            starts.append(at + np.flatnonzero(np.diff(seq, prepend=seq[0] - 1 if previous is None else previous)))
            previous, at = seq[-1], at + len(seq)
        self.starts = np.concatenate([*starts, np.array([at], np.int64)])
        vocab = store.df("SELECT DISTINCT token_id, token FROM tokens")
        strings = np.full(int(vocab["token_id"].max()) + 1 if len(vocab) else 0, "", dtype=object)
        strings[vocab["token_id"].to_numpy(np.int64)] = vocab["token"].to_numpy(object)
        self.strings = strings

    def __len__(self) -> int:
        return len(self.token_id)

    def window(self, token_index: int, left: int, right: int) -> np.ndarray:
        """Token indices around token_index within its own sequence."""
        seq = int(np.searchsorted(self.starts, token_index, "right")) - 1
        return np.arange(max(token_index - left, int(self.starts[seq])), min(token_index + right + 1, int(self.starts[seq + 1])))

    def text(self, idx: np.ndarray) -> list[str]:
        return self.strings[self.token_id[idx]].tolist()


@dataclass
class Example:
    """One activating token with its context: tokens[i] had activation acts[i]."""

    token_index: int
    value: float
    tokens: list[str]
    acts: list[float]
    centre: int


@dataclass
class FeaturePage:
    feature: int
    count: int
    density: float
    max: float
    mean: float
    top: list[Example]
    intervals: list[tuple[str, list[Example]]]
    #: (low, high, share of the feature's activations) of each interval, in the order of intervals
    interval_bins: list[tuple[float, float, float]]
    values: np.ndarray = field(repr=False)
    correlated: pd.DataFrame = field(repr=False)


class FeatureTables:
    """The feature pass's tables of one SAE in a store."""

    def __init__(self, store: Store, name: str) -> None:
        views = store.views()
        if features_table(name) not in views:
            raise WorkbenchError(f"store {store.root} has no features for SAE '{name}'; run `workbench features SAE_DIR --store {store.root}`")
        self.store, self.name = store, name
        self.stats = store.df(f"SELECT * FROM {sql_identifier(stats_table(name))} ORDER BY feature")
        self.info = store.df(f"SELECT * FROM {SAES_TABLE} WHERE name = ?", [name]).iloc[0].to_dict()
        # One in-memory DuckDB for the object's life (opening one costs tens of ms); each query
        # runs on its own cursor, so app threads never share one. The views point at files.
        self._con = duckdb.connect(":memory:", config={"enable_object_cache": True})
        self._con.execute(f"CREATE VIEW feature_rows AS SELECT * FROM {parquet_source(views[features_table(name)])}")
        corr = views.get(corr_table(name))
        self.has_correlations = corr is not None
        if corr is not None:
            self._con.execute(f"CREATE VIEW feature_corr AS SELECT * FROM {parquet_source(corr)}")

    @property
    def d_sae(self) -> int:
        return len(self.stats)

    def rows(self, feature: int) -> tuple[np.ndarray, np.ndarray]:
        """(token_index, value) of every token the feature fires on, largest value first."""
        with self._con.cursor() as cur:
            got = cur.execute(
                "SELECT token_index, value FROM feature_rows WHERE feature = ? ORDER BY value DESC", [feature]
            ).fetchnumpy()
        return got["token_index"].astype(np.int64), got["value"].astype(np.float32)

    def correlated(self, feature: int) -> pd.DataFrame:
        """The feature's co-firing partners (other, corr), strongest first."""
        if not self.has_correlations:
            return pd.DataFrame(columns=["other", "corr"])
        with self._con.cursor() as cur:
            return cur.execute("SELECT other, corr FROM feature_corr WHERE feature = ? ORDER BY corr DESC", [feature]).df()

    def page(
        self, feature: int, text: TokenText, n_top: int = 20, n_intervals: int = 5, per_interval: int = 4,
        left: int = 12, right: int = 4, bins: str = "linear",
    ) -> FeaturePage:
        """Everything the feature page shows for one feature. The intervals split the range
        (0, max] evenly (bins="linear") or at quantiles of the feature's activations
        (bins="quantile", each holding about as many activations: Neuronpedia's bins)."""
        if bins not in ("linear", "quantile"):
            raise WorkbenchError(f"bins must be linear or quantile, got '{bins}'")
        if not 0 <= feature < self.d_sae:
            raise WorkbenchError(f"feature {feature} is out of range: SAE '{self.name}' has features 0..{self.d_sae - 1}")
        token_index, value = self.rows(feature)
        by_token = np.argsort(token_index)
        sorted_tokens, sorted_values = token_index[by_token], value[by_token]

        def example(i: int) -> Example:
            idx = text.window(int(token_index[i]), left, right)
            pos = np.searchsorted(sorted_tokens, idx)
            pos = np.minimum(pos, max(len(sorted_tokens) - 1, 0))
            hit = (sorted_tokens[pos] == idx) if len(sorted_tokens) else np.zeros(len(idx), bool)
            acts = np.where(hit, sorted_values[pos] if len(sorted_values) else 0.0, 0.0)
            return Example(int(token_index[i]), float(value[i]), text.text(idx), acts.tolist(), int(np.flatnonzero(idx == token_index[i])[0]))

        top = [example(i) for i in range(min(n_top, len(value)))]
        intervals: list[tuple[str, list[Example]]] = []
        interval_bins: list[tuple[float, float, float]] = []
        if len(value):
            if bins == "linear":
                edges = np.linspace(0.0, float(value[0]), n_intervals + 1)
            else:  # repeated values give repeated quantiles: one bin each
                edges = np.unique(np.quantile(value.astype(np.float64), np.linspace(0.0, 1.0, n_intervals + 1)))
                edges = edges if len(edges) > 1 else np.array([0.0, float(value[0])])
            rng = np.random.default_rng(feature)
            for n, (lo, hi) in enumerate(pairwise(edges)):
                inside = np.flatnonzero(((value >= lo) if n == 0 else (value > lo)) & (value <= hi))
                pick = np.sort(rng.choice(inside, size=min(per_interval, len(inside)), replace=False)) if len(inside) else inside
                intervals.append((f"{lo:.3g} to {hi:.3g}", [example(int(i)) for i in pick]))
                interval_bins.append((float(lo), float(hi), len(inside) / len(value)))
        stat = self.stats.iloc[feature]
        return FeaturePage(
            feature=feature,
            count=int(stat["count"]),
            density=float(stat["density"]),
            max=float(stat["max"]),
            mean=float(stat["mean"]),
            top=top,
            intervals=intervals[::-1],
            interval_bins=interval_bins[::-1],
            values=value,
            correlated=self.correlated(feature),
        )

    def search_token(self, token: str, limit: int = 20) -> pd.DataFrame:
        """Features that fire most often on a token string (exact match, stripped of spaces)."""
        return self.store.df(
            f"""
            WITH hits AS (SELECT token_index FROM tokens WHERE trim(token) = trim(?))
            SELECT f.feature, count(*) AS fires, avg(f.value) AS mean_value,
                   count(*) / (SELECT count(*) FROM hits) AS share_of_token
            FROM {sql_identifier(features_table(self.name))} f SEMI JOIN hits USING (token_index)
            GROUP BY f.feature ORDER BY fires DESC, mean_value DESC LIMIT ?
            """,
            [token, limit],
        )


def list_saes(store: Store) -> pd.DataFrame:
    """The saes table (one row per feature pass), or an empty frame."""
    if SAES_TABLE not in store.views():
        return pd.DataFrame(columns=["name", "folder", "hook", "rule", "d_sae", "tokens", "l0", "fvu", "dead_fraction"])
    frame = store.df(f"SELECT * FROM {SAES_TABLE} ORDER BY name")
    frame["present"] = [Path(f).is_dir() for f in frame["folder"]]
    return frame
