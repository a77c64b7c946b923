"""Where an SAE's features meet the phenomena: link tables joining a feature pass to the probes.

The feature pass says which tokens each feature fires on; the probes say which tokens were
routed to which expert, which positions heads sink their attention into, which tokens carry a
massive activation, and how often each MLP neuron fires. `workbench links` joins them, per SAE
`<name>`, into four tables a notebook queries with plain SQL:

  link_feature_summary_<name>   (feature, fires, top_tokens, distinct_top_tokens,
                                top_token_entropy, top_pos0_share, sink_fires, sink_share,
                                sink_base, massive_fires, massive_share, massive_base):
                                entropy (nats) of the token ids of the feature's TOP_TOKENS
                                largest activations and the share of them at position 0; of all
                                its firings, how many sit on sink tokens / massive-activation
                                tokens, against the share of all tokens that are (the base).
  link_feature_experts_<name>   (feature, layer, expert, slots, share, load_share, lift): routing
                                slots of the feature's top tokens per expert, their share of the
                                feature's slots in that layer, the expert's share of all slots
                                (its load) and share / load_share.
  link_feature_neurons_<name>   (feature, rank, layer, neuron, cosine, rule, frequency, dead,
                                dense): the NEURONS_PER_FEATURE MLP neurons whose output
                                direction W_out[layer][neuron] is closest (cosine) to the
                                feature's decoder row, with the lazy probe's firing frequency.
  link_phenomenon_features_<name> (kind, layer, unit, marked, rank, feature, fires, tokens, share,
                                mean_value, density, lift): for every expert (marked: super),
                                attention head (marked: sink) and dead or dense neuron (marked:
                                dead / dense), the features firing most on the tokens behind it.

Token sets: a sink token is a key position some head gives mean attention above SINK_EPS in its
sample (the first position's alpha_1, or a later one's hidden-sink alpha); a massive-activation
token holds a sample's largest |h| of a layer's residual stream at least MASSIVE_TOKEN_RATIO
times the sample's median |h| (Sun et al. ask 1000x on large models; tiny ones reach tens).
The tokens behind an expert are its largest outputs (expert_max), behind a head the sink
tokens it attends to, behind a neuron its largest activations (lazy_neuron_top).

Tables a store cannot feed (no routing probe, no model to read W_out from) are written empty,
so a rerun never leaves an earlier run's rows beside new ones. All four and a row of the
`links` table (the features files they were computed from, relative to the store, so a page
can tell links older than the feature pass) publish as one unit of the group LINKS_GROUP.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from workbench.analysis.attention_sinks import SINK_EPS, sink_heads
from workbench.analysis.features import SAES_TABLE, features_table, stats_table
from workbench.analysis.lazy_neurons import DENSE_FREQUENCY, neuron_frequencies
from workbench.analysis.super_experts import expert_maxima, mark_super_experts
from workbench.capture.probes.lazy_neurons import mlp_out_weight, mlp_post_hooks
from workbench.capture.probes.registry import PROBE_TABLES
from workbench.errors import WorkbenchError
from workbench.models.handle import ModelHandle
from workbench.store.reader import Store, sql_identifier
from workbench.store.table_group import TableUnit

LINKS_GROUP = "feature_links"
LINKS_TABLE = "links"
TOP_TOKENS = 64
NEURONS_PER_FEATURE = 5
FEATURES_PER_PHENOMENON = 10
MASSIVE_TOKEN_RATIO = 10.0
#: The lazy probe's rule whose frequencies the neuron link shows: FAT-eps where the model has it
#: (GELU/SiLU), exact zeros for ReLU models.
RULE_PREFERENCE = ("fat", "zero")
COSINE_CHUNK = 4096


def summary_table(name: str) -> str:
    return f"link_feature_summary_{name}"


def experts_table(name: str) -> str:
    return f"link_feature_experts_{name}"


def neurons_table(name: str) -> str:
    return f"link_feature_neurons_{name}"


def phenomena_table(name: str) -> str:
    return f"link_phenomenon_features_{name}"


NEURON_SCHEMA = pa.schema([
    ("feature", pa.int32()), ("rank", pa.int32()), ("layer", pa.int32()), ("neuron", pa.int32()), ("cosine", pa.float32()),
    ("rule", pa.string()), ("frequency", pa.float64()), ("dead", pa.bool_()), ("dense", pa.bool_()),
])  # fmt: skip
EXPERT_SCHEMA = pa.schema([
    ("feature", pa.int32()), ("layer", pa.int32()), ("expert", pa.int32()), ("slots", pa.int64()),
    ("share", pa.float64()), ("load_share", pa.float64()), ("lift", pa.float64()),
])  # fmt: skip
PHENOMENON_SCHEMA = pa.schema([
    ("kind", pa.string()), ("layer", pa.int32()), ("unit", pa.int32()), ("marked", pa.string()), ("rank", pa.int32()),
    ("feature", pa.int32()), ("fires", pa.int64()), ("tokens", pa.int64()), ("share", pa.float64()),
    ("mean_value", pa.float64()), ("density", pa.float64()), ("lift", pa.float64()),
])  # fmt: skip


@dataclass
class LinksReport:
    """What `workbench links` prints and records in the links table."""

    name: str
    features_files: str
    sink_tokens: int
    massive_tokens: int
    expert_rows: int
    neuron_rows: int
    phenomenon_rows: int
    neuron_note: str


def _has(store: Store, probe: str) -> bool:
    return PROBE_TABLES[probe] in store.info()["probe_tables"]


def _typed(frame: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)


def _token_sets(con: duckdb.DuckDBPyConnection, store: Store) -> None:
    """Temp tables sink_tokens(token_index) and massive_tokens(token_index), empty without their probe."""
    if _has(store, "sinks"):
        con.execute(
            """CREATE TEMP TABLE sink_tokens AS
               SELECT first_token_index AS token_index FROM sink_first_alpha WHERE alpha_1 > $eps
               UNION SELECT token_index FROM sink_hidden WHERE alpha > $eps""",
            {"eps": SINK_EPS},
        )
    else:
        con.execute("CREATE TEMP TABLE sink_tokens (token_index BIGINT)")
    if _has(store, "experts"):
        con.execute(
            """CREATE TEMP TABLE massive_tokens AS SELECT DISTINCT token_index FROM massive_activations
               WHERE rank = 1 AND value >= ? * median""",
            [MASSIVE_TOKEN_RATIO],
        )
    else:
        con.execute("CREATE TEMP TABLE massive_tokens (token_index BIGINT)")


def feature_summary(con: duckdb.DuckDBPyConnection, store: Store, name: str) -> pd.DataFrame:
    """link_feature_summary rows of every feature (the temp tables of _token_sets must exist);
    the sink / massive columns are null where the store lacks their probe."""
    frame = con.execute(
        f"""
        WITH top AS (
            SELECT f.feature, t.token_id, t.pos FROM top_rows AS f JOIN tokens AS t USING (token_index)
        ), per_token AS (
            SELECT feature, token_id, count(*) AS c FROM top GROUP BY ALL
        ), entropy AS (
            SELECT feature, sum(c)::BIGINT AS top_tokens, count(*) AS distinct_top_tokens,
                   ln(sum(c)) - sum(c * ln(c)) / sum(c) AS top_token_entropy
            FROM per_token GROUP BY feature
        ), pos0 AS (
            SELECT feature, avg((pos = 0)::DOUBLE) AS top_pos0_share FROM top GROUP BY feature
        ), fires AS (
            SELECT f.feature, count(*) AS fires,
                   count(s.token_index) AS sink_fires, count(m.token_index) AS massive_fires
            FROM {sql_identifier(features_table(name))} AS f
            LEFT JOIN sink_tokens AS s USING (token_index) LEFT JOIN massive_tokens AS m USING (token_index)
            GROUP BY f.feature
        ), base AS (
            SELECT (SELECT count(*) FROM sink_tokens) / count(*) AS sink_base,
                   (SELECT count(*) FROM massive_tokens) / count(*) AS massive_base FROM tokens
        )
        SELECT st.feature::INT AS feature, coalesce(fires.fires, 0) AS fires,
               coalesce(entropy.top_tokens, 0) AS top_tokens, coalesce(entropy.distinct_top_tokens, 0) AS distinct_top_tokens,
               entropy.top_token_entropy, pos0.top_pos0_share,
               coalesce(fires.sink_fires, 0) AS sink_fires, fires.sink_fires / fires.fires AS sink_share, base.sink_base,
               coalesce(fires.massive_fires, 0) AS massive_fires, fires.massive_fires / fires.fires AS massive_share,
               base.massive_base
        FROM {sql_identifier(stats_table(name))} AS st LEFT JOIN fires USING (feature) LEFT JOIN entropy USING (feature)
        LEFT JOIN pos0 USING (feature) CROSS JOIN base
        ORDER BY feature
        """
    ).df()
    for probe, column in (("sinks", "sink"), ("experts", "massive")):
        if not _has(store, probe):
            frame[f"{column}_fires"] = pd.array([pd.NA] * len(frame), dtype="Int64")
            frame[[f"{column}_share", f"{column}_base"]] = np.nan
    return frame


def feature_experts(con: duckdb.DuckDBPyConnection) -> pa.Table:
    """link_feature_experts rows: the experts the features' top tokens are routed to, against their load."""
    frame = con.execute(
        """
        WITH slots AS (
            SELECT top.feature, c.layer, c.expert, count(*) AS slots
            FROM top_rows AS top JOIN routing_choices AS c USING (token_index) GROUP BY ALL
        ), load AS (
            SELECT layer, expert, sum(slots) / sum(sum(slots)) OVER (PARTITION BY layer) AS load_share
            FROM routing_load GROUP BY layer, expert
        )
        SELECT s.feature, s.layer, s.expert, s.slots,
               s.slots / sum(s.slots) OVER (PARTITION BY s.feature, s.layer) AS share, load.load_share
        FROM slots AS s JOIN load USING (layer, expert) ORDER BY s.feature, s.layer, s.expert
        """
    ).df()
    frame["lift"] = frame["share"] / frame["load_share"].where(frame["load_share"] > 0)
    return _typed(frame, EXPERT_SCHEMA)


def _stream_layers(hook: str, layers: list[int]) -> list[int]:
    """The MLP layers whose output the hooked activations contain: blocks.L.hook_resid_post holds
    MLPs 0..L, hook_resid_pre/mid 0..L-1, hook_mlp_out L alone; any other hook every layer."""
    parts = hook.split(".")
    if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit():
        return layers
    block, point = int(parts[1]), parts[-1]
    last = {"hook_resid_post": block, "hook_resid_pre": block - 1, "hook_resid_mid": block - 1}.get(point)
    if point == "hook_mlp_out":
        return [l for l in layers if l == block]
    return layers if last is None else [l for l in layers if l <= last]


def neuron_cosines(decoder: torch.Tensor, w_out: dict[int, torch.Tensor], top: int = NEURONS_PER_FEATURE) -> pd.DataFrame:
    """feature, rank, layer, neuron, cosine: each decoder row's `top` closest neuron output
    directions (signed cosine, largest first) over the given layers' W_out [d_mlp, d_model]."""
    layers = sorted(w_out)
    directions = torch.cat([torch.nn.functional.normalize(w_out[l].float(), dim=1) for l in layers])
    owner = np.concatenate([np.full(len(w_out[l]), l) for l in layers])
    index = np.concatenate([np.arange(len(w_out[l])) for l in layers])
    rows = []
    k = min(top, len(directions))
    for lo in range(0, len(decoder), COSINE_CHUNK):
        rows_dec = torch.nn.functional.normalize(decoder[lo : lo + COSINE_CHUNK].float(), dim=1)
        best = torch.topk(rows_dec @ directions.T, k, dim=1)
        at = best.indices.numpy()
        rows.append(pd.DataFrame({
            "feature": np.repeat(np.arange(lo, lo + len(rows_dec)), k), "rank": np.tile(np.arange(k), len(rows_dec)),
            "layer": owner[at].reshape(-1), "neuron": index[at].reshape(-1), "cosine": best.values.numpy().reshape(-1),
        }))  # fmt: skip
    return pd.concat(rows, ignore_index=True)


def _neuron_flags(store: Store) -> pd.DataFrame:
    """layer, neuron, rule, frequency, dead, dense under the preferred lazy rule; empty without the
    probe or without dense MLP rows (an all-MoE model's neurons are counted per expert)."""
    columns = ["layer", "neuron", "rule", "frequency", "dead", "dense"]
    if not _has(store, "lazy"):
        return pd.DataFrame(columns=columns)
    freqs = neuron_frequencies(store)
    if freqs.empty:
        return pd.DataFrame(columns=columns)
    rule = next(r for r in (*RULE_PREFERENCE, *freqs["rule"].unique()) if r in set(freqs["rule"]))
    chosen = freqs[freqs["rule"] == rule]
    return chosen.assign(dead=chosen["fired"] == 0, dense=chosen["frequency"] >= DENSE_FREQUENCY)[
        ["layer", "neuron", "rule", "frequency", "dead", "dense"]
    ]


def feature_neurons(store: Store, decoder: torch.Tensor, hook: str, handle: ModelHandle | None) -> tuple[pa.Table, str]:
    """(link_feature_neurons rows, "" or why there are none)."""
    if handle is None:
        return NEURON_SCHEMA.empty_table(), f"model '{store.model_name}' is not loadable here"
    weights = {int(h.split(".")[1]): mlp_out_weight(handle, int(h.split(".")[1])) for h in mlp_post_hooks(handle)}
    usable = {l: w for l, w in weights.items() if w is not None and w.shape[1] == decoder.shape[1]}
    usable = {l: usable[l] for l in _stream_layers(hook, sorted(usable))}
    if not usable:
        return NEURON_SCHEMA.empty_table(), f"no dense MLP of {store.model_name} writes into {hook}"
    links = neuron_cosines(decoder, usable)
    flags = _neuron_flags(store)
    links = links.merge(flags, on=["layer", "neuron"], how="left") if len(flags) else links.assign(
        rule=None, frequency=np.nan, dead=None, dense=None
    )
    return _typed(links.sort_values(["feature", "rank"]), NEURON_SCHEMA), ""


def _phenomenon_units(store: Store) -> pd.DataFrame:
    """kind, layer, unit, marked for every expert, attention head and dead or dense neuron the store knows."""
    parts = []
    if _has(store, "experts"):
        experts = mark_super_experts(expert_maxima(store), int(store.info()["model"]["n_layers"]))
        parts.append(pd.DataFrame({"kind": "expert", "layer": experts["layer"], "unit": experts["expert"],
                                   "marked": np.where(experts["is_super"], "super", "")}))  # fmt: skip
    if _has(store, "sinks"):
        heads = store.df("SELECT DISTINCT layer, head FROM sink_first_alpha ORDER BY layer, head")
        sinks = set(map(tuple, sink_heads(store)[["layer", "head"]].to_numpy().tolist()))
        parts.append(pd.DataFrame({"kind": "head", "layer": heads["layer"], "unit": heads["head"],
                                   "marked": ["sink" if (l, h) in sinks else "" for l, h in zip(heads["layer"], heads["head"])]}))  # fmt: skip
    flags = _neuron_flags(store)
    odd = flags[flags["dead"].astype(bool) | flags["dense"].astype(bool)]
    parts.append(pd.DataFrame({"kind": "neuron", "layer": odd["layer"], "unit": odd["neuron"],
                               "marked": np.where(odd["dead"].astype(bool), "dead", "dense")}))  # fmt: skip
    return pd.concat(parts, ignore_index=True).astype({"layer": "int32", "unit": "int32"})


def phenomenon_features(con: duckdb.DuckDBPyConnection, store: Store, name: str) -> pa.Table:
    """link_phenomenon_features rows: per expert, head and dead/dense neuron, its top features."""
    units = _phenomenon_units(store)
    if not len(units):
        return PHENOMENON_SCHEMA.empty_table()
    con.register("units", units)
    sources = []
    if _has(store, "experts"):
        sources.append("SELECT 'expert' AS kind, layer, expert AS unit, token_index FROM expert_max")
    if _has(store, "sinks"):
        sources.append(
            "SELECT 'head' AS kind, layer, head AS unit, first_token_index AS token_index FROM sink_first_alpha WHERE alpha_1 > $eps "
            "UNION SELECT 'head', layer, head, token_index FROM sink_hidden WHERE alpha > $eps"
        )
    if _has(store, "lazy"):
        sources.append("SELECT 'neuron' AS kind, layer, neuron AS unit, token_index FROM lazy_neuron_top")
    frame = con.execute(
        f"""
        WITH unit_tokens AS (
            SELECT DISTINCT u.kind, u.layer, u.unit, u.marked, t.token_index
            FROM ({" UNION ALL ".join(sources)}) AS t JOIN units AS u USING (kind, layer, unit)
        ), sizes AS (
            SELECT kind, layer, unit, count(*) AS tokens FROM unit_tokens GROUP BY ALL
        ), hits AS (
            SELECT u.kind, u.layer, u.unit, u.marked, f.feature, count(*) AS fires, avg(f.value) AS mean_value
            FROM unit_tokens AS u JOIN {sql_identifier(features_table(name))} AS f USING (token_index) GROUP BY ALL
        )
        SELECT h.*, sizes.tokens, h.fires / sizes.tokens AS share, st.density, (h.fires / sizes.tokens) / st.density AS lift,
               row_number() OVER (PARTITION BY h.kind, h.layer, h.unit ORDER BY h.fires DESC, h.mean_value DESC, h.feature) - 1 AS rank
        FROM hits AS h JOIN sizes USING (kind, layer, unit) JOIN {sql_identifier(stats_table(name))} AS st USING (feature)
        QUALIFY rank < $top ORDER BY h.kind, h.layer, h.unit, rank
        """,
        {"eps": SINK_EPS, "top": FEATURES_PER_PHENOMENON} if "$eps" in " ".join(sources) else {"top": FEATURES_PER_PHENOMENON},
    ).df()
    return _typed(frame, PHENOMENON_SCHEMA)


def stored_files(store: Store, table: str) -> str:
    """The files behind a table, relative to the store's folder (a moved store keeps its links)."""
    return ",".join(os.path.relpath(f, store.root) for f in store.views().get(table, []))


def _sae_row(store: Store, name: str) -> dict:
    views = store.views()
    if features_table(name) not in views or SAES_TABLE not in views:
        raise WorkbenchError(f"store {store.root} has no features for SAE '{name}'; run `workbench features SAE_DIR --store {store.root}`")
    return store.df(f"SELECT * FROM {SAES_TABLE} WHERE name = ?", [name]).iloc[0].to_dict()


def _decoder(folder: str) -> torch.Tensor | None:
    """The SAE's decoder rows [d_sae, d_in], or None when its folder is gone."""
    from sae.io import load_sae

    if not Path(folder).is_dir():
        return None
    return load_sae(folder)[0].W_dec.detach()


def run_links(store: Store, name: str, handle: ModelHandle | None) -> LinksReport:
    """Compute one SAE's four link tables and publish them with its links row as one unit.
    handle is the store's model (for W_out); None leaves the neuron link empty."""
    sae = _sae_row(store, name)
    features_files = stored_files(store, features_table(name))
    con = store.connect()
    try:
        con.execute(
            f"""CREATE TEMP TABLE top_rows AS SELECT feature, token_index FROM {sql_identifier(features_table(name))}
                QUALIFY row_number() OVER (PARTITION BY feature ORDER BY value DESC, token_index) <= ?""",
            [TOP_TOKENS],
        )
        _token_sets(con, store)
        summary = feature_summary(con, store, name)
        experts = feature_experts(con) if _has(store, "routing") else EXPERT_SCHEMA.empty_table()
        phenomena = phenomenon_features(con, store, name)
        sizes = con.execute("SELECT (SELECT count(*) FROM sink_tokens), (SELECT count(*) FROM massive_tokens)").fetchone()
    except duckdb.Error as err:
        raise WorkbenchError(f"links of SAE '{name}' failed on store {store.root}: {str(err).splitlines()[0]}") from err
    finally:
        con.close()
    decoder = _decoder(str(sae["folder"]))
    if decoder is None:
        neurons, note = NEURON_SCHEMA.empty_table(), f"SAE folder {sae['folder']} is gone"
    else:
        neurons, note = feature_neurons(store, decoder, str(sae["hook"]), handle)
    report = LinksReport(name, features_files, int(sizes[0]), int(sizes[1]), experts.num_rows, neurons.num_rows, phenomena.num_rows, note)
    links = pd.DataFrame([asdict(report)])
    if LINKS_TABLE in store.views():
        old = store.df(f"SELECT * FROM {LINKS_TABLE} WHERE name <> ?", [name])
        links = pd.concat([old, links], ignore_index=True) if len(old) else links
    with TableUnit(store.root, LINKS_GROUP) as unit:
        unit.write_table(summary_table(name), summary)
        unit.write_table(experts_table(name), experts)
        unit.write_table(neurons_table(name), neurons)
        unit.write_table(phenomena_table(name), phenomena)
        unit.write_table(LINKS_TABLE, links.sort_values("name").reset_index(drop=True))
    return report
