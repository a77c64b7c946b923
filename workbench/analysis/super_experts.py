"""Super experts and massive activations from the `experts` probe.

The rule of Su et al. (2025): with a_{l,e} the max |down-proj output| of expert e in layer l
over every routed token, expert (l, e) is super when l lies in the first 75% of layers
(l < 0.75 * n_layers, 0-indexed) and a_{l,e} exceeds both the 99.5th percentile of all
a_{l,e} (every layer, numpy's linear interpolation) and max(a) / 10.
Massive activations (Sun et al. 2024): per layer the top-1/2/3 |h| of the residual stream
against the median |h|; massive when above 100 and ~1000x the median.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from workbench.capture.probes.registry import require_probe
from workbench.store.reader import Store
from workbench.store.table_group import TableUnit

PERCENTILE, MAX_RATIO, LAYER_FRACTION = 99.5, 10.0, 0.75
MASSIVE_VALUE, MASSIVE_RATIO = 100.0, 1000.0


def expert_maxima(store: Store) -> pd.DataFrame:
    """layer, expert, a, routed, token_index, channel, seq, pos, token: each expert's largest output."""
    require_probe(store, "experts")
    return store.df(
        """
        WITH best AS (
            SELECT layer, expert, value, token_index, channel,
                   row_number() OVER (PARTITION BY layer, expert ORDER BY value DESC, token_index) AS r
            FROM expert_max
        ), routed AS (
            SELECT layer, expert, sum(routed) AS routed FROM expert_max WHERE rank = 0 GROUP BY layer, expert
        )
        SELECT routed.layer, routed.expert, coalesce(best.value, 0.0) AS a, routed.routed,
               best.token_index, best.channel, t.seq, t.pos, t.token
        FROM routed LEFT JOIN best ON best.layer = routed.layer AND best.expert = routed.expert AND best.r = 1
        LEFT JOIN tokens AS t ON t.token_index = best.token_index
        ORDER BY routed.layer, routed.expert
        """
    )


def mark_super_experts(
    maxima: pd.DataFrame,
    n_layers: int,
    percentile: float = PERCENTILE,
    max_ratio: float = MAX_RATIO,
    layer_fraction: float = LAYER_FRACTION,
) -> pd.DataFrame:
    """maxima with threshold, is_super (the rule above) and ratio_to_median (a / median a) added.

    The global maximum always passes both cuts, so in an early layer it is always "super";
    ratio_to_median tells whether it is an outlier or just the largest of similar values.
    """
    values = maxima["a"].to_numpy(dtype=float)
    cut = max(float(np.percentile(values, percentile)), float(values.max()) / max_ratio) if len(values) else math.inf
    early = maxima["layer"] < layer_fraction * n_layers
    median = float(np.median(values)) if len(values) else math.nan
    return maxima.assign(threshold=cut, is_super=early & (maxima["a"] > cut), ratio_to_median=maxima["a"] / median)


def expert_top_tokens(store: Store, n: int = 3) -> pd.DataFrame:
    """The n largest outputs of every expert over the capture, with their tokens in context."""
    require_probe(store, "experts")
    return store.df(
        """
        SELECT * FROM (
            SELECT e.layer, e.expert, e.value, e.token_index, e.channel, t.seq, t.pos, t.token,
                   row_number() OVER (PARTITION BY e.layer, e.expert ORDER BY e.value DESC) AS rank
            FROM expert_max AS e JOIN tokens AS t USING (token_index)
        ) WHERE rank <= ? ORDER BY layer, expert, rank
        """,
        [n],
    )


def massive_activations(store: Store) -> pd.DataFrame:
    """Per layer: mean over samples of the top-1/2/3 and median |h|; the top-1 channels; is_massive.

    top{r}: the r-th largest |h| of a sample's residual stream, averaged over samples;
    top1_max: the largest |h| seen, with its channel and token; top1_channel: the channel
    most often holding a sample's top-1 (with the share of samples where it does).
    """
    require_probe(store, "experts")
    means = store.df(
        """
        SELECT layer, rank, avg(value) AS value, avg(median) AS median, count(*) AS samples
        FROM massive_activations GROUP BY layer, rank
        """
    )
    if means.empty:  # the model exposes no blocks.L.hook_resid_post
        return pd.DataFrame(columns=["layer", "top1", "top2", "top3", "median", "samples", "ratio", "is_massive"])
    summary = means.pivot(index="layer", columns="rank", values="value")
    summary.columns = [f"top{r}" for r in summary.columns]
    summary = summary.join(means[means["rank"] == 1].set_index("layer")[["median", "samples"]]).reset_index()
    channels = store.df(
        """
        SELECT layer, channel AS top1_channel, count(*) AS n FROM massive_activations WHERE rank = 1
        GROUP BY layer, channel QUALIFY row_number() OVER (PARTITION BY layer ORDER BY count(*) DESC, channel) = 1
        """
    )
    peak = store.df(
        """
        SELECT m.layer, m.value AS top1_max, m.channel AS top1_max_channel, t.token AS top1_max_token
        FROM massive_activations AS m JOIN tokens AS t USING (token_index) WHERE m.rank = 1
        QUALIFY row_number() OVER (PARTITION BY m.layer ORDER BY m.value DESC, m.token_index) = 1
        """
    )
    summary = summary.merge(channels, on="layer").merge(peak, on="layer")
    summary["top1_channel_share"] = summary.pop("n") / summary["samples"]
    summary["ratio"] = summary["top1"] / summary["median"].clip(lower=1e-12)
    summary["is_massive"] = (summary["top1"] > MASSIVE_VALUE) & (summary["ratio"] > MASSIVE_RATIO)
    return summary.sort_values("layer").reset_index(drop=True)


def analyze_experts(store: Store) -> dict[str, pd.DataFrame]:
    """Super-expert table and massive-activation curve; persisted as super_experts and massive_activation_summary."""
    maxima = mark_super_experts(expert_maxima(store), int(store.info()["model"]["n_layers"]))
    massive = massive_activations(store)
    with TableUnit(store.root, "analysis_experts") as unit:  # published together
        unit.write_table("super_experts", maxima)
        unit.write_table("massive_activation_summary", massive)
    return {"experts": maxima, "super": maxima[maxima["is_super"]].reset_index(drop=True), "massive": massive}
