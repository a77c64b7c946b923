"""Stores with planted phenomena and planted features for the link tests and their pages.

The dense store comes from a ReLU model with a sink head, a dead and a dense MLP neuron planted;
the MoE store from a model whose [BOS] carries a massive activation. On each, SAE `planted`
has feature tables written directly: every feature fires on a token set taken from the probes'
rows (the tokens routed to one expert, the sink tokens, one neuron's top tokens...), so each link
has one known answer. SAE `neurons` on the dense store is a real feature pass of an SAE whose
decoder rows are planted MLP output directions.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import torch

from sae.io import save_sae
from sae.model import SparseAutoencoder
from sae.rules import TopKRule
from tests.app_stores import HOOK
from tests.phenomena_models import capture, dense_config, handle_for, moe_config, plant_sink_head
from workbench import Store
from workbench.analysis.attention_sinks import SINK_EPS
from workbench.analysis.features import FEATURES_GROUP, FeaturePassReport, _sae_rows, features_table, run_feature_pass, stats_table
from workbench.analysis.links import MASSIVE_TOKEN_RATIO, run_links
from workbench.analysis.super_experts import expert_maxima, mark_super_experts
from workbench.models.handle import ModelHandle
from workbench.store.table_group import TableUnit

DEAD, DENSE = (0, 5), (0, 6)  # (layer, neuron)
SINK_HEAD = (1, 2)
NEURON_ROWS = {0: (1, 7), 1: (0, 9)}  # feature -> (layer, neuron) whose W_out row it decodes to


def dense_handle() -> ModelHandle:
    """The dense model with its planted sink head, dead neuron and dense neuron."""
    handle = handle_for(dense_config("relu", normalization_type=None, seed=1))
    plant_sink_head(handle, *SINK_HEAD)
    with torch.no_grad():
        handle.model.blocks[DEAD[0]].mlp.b_in[DEAD[1]] = -1e3
        handle.model.blocks[DENSE[0]].mlp.b_in[DENSE[1]] = 50.0
    return handle


def moe_handle() -> ModelHandle:
    """The MoE model, its [BOS] embedding carrying |h| = 1000 on channel 0."""
    handle = handle_for(moe_config(), name="planted-moe")
    with torch.no_grad():
        handle.model.W_E[0, 0] = 1000.0
    return handle


def random_sae(folder: Path, d_sae: int, rows: dict[int, torch.Tensor] | None = None) -> Path:
    """A TopK SAE on HOOK, decoder rows replaced by `rows` (feature -> direction), encoder tied."""
    model = SparseAutoencoder(32, d_sae, TopKRule(2))
    model.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():
        for feature, direction in (rows or {}).items():
            model.W_dec[feature] = direction / direction.norm()
        model.W_enc.copy_(model.W_dec.T)
    return save_sae(folder, model, metadata={"hook_name": HOOK, "model_name": "planted"})


def plant_features(store: Store, name: str, folder: Path, firing: dict[int, list[int]], d_sae: int) -> None:
    """Feature tables of SAE `name` in which feature f fires on firing[f] (largest value first)."""
    rows = [(f, 1.0 + (len(tokens) - i) / len(tokens), t) for f, tokens in sorted(firing.items()) for i, t in enumerate(tokens)]
    frame = pd.DataFrame(rows, columns=["feature", "value", "token_index"]).astype({"feature": "int32", "value": "float32", "token_index": "int64"})
    n = store.n_tokens()
    stats = frame.groupby("feature").agg(count=("value", "size"), max=("value", "max"), mean=("value", "mean"))
    stats = stats.reindex(range(d_sae), fill_value=0).rename_axis("feature").reset_index()
    stats = stats.assign(feature=stats["feature"].astype("int32"), density=stats["count"] / n)
    report = FeaturePassReport(name=name, folder=str(folder), hook=HOOK, rule="topk", d_in=32, d_sae=d_sae, tokens=n, rows=len(frame),
                               l0=len(frame) / n, fvu=0.5, dead_fraction=float((stats["count"] == 0).mean()), corr_tokens=0, seconds=0.0)  # fmt: skip
    with TableUnit(store.root, FEATURES_GROUP) as unit:
        unit.write_table(features_table(name), pa.Table.from_pandas(frame, preserve_index=False))
        unit.write_table(stats_table(name), stats[["feature", "count", "density", "max", "mean"]])
        unit.write_table("saes", _sae_rows(store, report))


def sink_tokens(store: Store) -> list[int]:
    """Sink tokens straight from the definition: alpha above SINK_EPS in some head of the sample."""
    first = store.df("SELECT first_token_index AS t FROM sink_first_alpha WHERE alpha_1 > ?", [SINK_EPS])["t"]
    hidden = store.df("SELECT token_index AS t FROM sink_hidden WHERE alpha > ?", [SINK_EPS])["t"]
    return sorted(set(first) | set(hidden))


def neuron_tokens(store: Store, layer: int, neuron: int) -> list[int]:
    got = store.df("SELECT DISTINCT token_index FROM lazy_neuron_top WHERE layer = ? AND neuron = ? ORDER BY 1", [layer, neuron])
    return got["token_index"].tolist()


def _dense(root: Path) -> Store:
    handle = dense_handle()
    store = capture(handle, root, ["lazy", "sinks"], tokens=2000, ctx=48, batch_size=8, hooks=[HOOK])
    out = handle.model.blocks
    run_feature_pass(
        store, random_sae(root / "sae-neurons", 16, {f: out[l].mlp.W_out[n].detach() for f, (l, n) in NEURON_ROWS.items()}), name="neurons"
    )
    tokens = store.tokens()
    sinks = set(sink_tokens(store))
    later = tokens[tokens["pos"] > 0]
    three = later[later["token"].isin(["e", "a", "t"])]["token_index"].tolist()
    bos = tokens[tokens["pos"] == 0]["token_index"].tolist()
    firing = {
        0: sorted(sinks),
        1: [t for t in later["token_index"] if t not in sinks][:15],  # under MIN_FIRES: never the opening feature
        2: neuron_tokens(store, *DEAD),
        3: neuron_tokens(store, *DENSE),
        4: three[:80],  # three token ids, none at position 0: the opening feature
        5: bos + later["token_index"].tolist()[:40],  # more varied, but its top examples are [BOS]
        6: later[later["token"] == "o"]["token_index"].tolist(),  # one token id
    }
    plant_features(store, "planted", random_sae(root / "sae-planted", 8), firing, d_sae=8)
    run_links(store, "neurons", handle)
    run_links(store, "planted", handle)
    return store


def routed_expert(store: Store, layer: int = 1) -> tuple[int, list[int]]:
    """The least loaded expert of a layer and up to 64 tokens routed to it."""
    load = store.df("SELECT expert, sum(slots) AS s FROM routing_load WHERE layer = ? GROUP BY expert ORDER BY s, expert", [layer])
    expert = int(load["expert"].iloc[0])
    tokens = store.df("SELECT DISTINCT token_index FROM routing_choices WHERE layer = ? AND expert = ? ORDER BY 1 LIMIT 64", [layer, expert])
    return expert, tokens["token_index"].tolist()


def massive_tokens(store: Store) -> list[int]:
    got = store.df("SELECT DISTINCT token_index FROM massive_activations WHERE rank = 1 AND value >= ? * median ORDER BY 1", [MASSIVE_TOKEN_RATIO])
    return got["token_index"].tolist()


def super_expert(store: Store) -> tuple[int, int, bool, list[int]]:
    """(layer, expert, is_super, its expert_max tokens) of the expert with the largest output."""
    marked = mark_super_experts(expert_maxima(store), int(store.info()["model"]["n_layers"])).sort_values("a", ascending=False)
    layer, expert, is_super = int(marked["layer"].iloc[0]), int(marked["expert"].iloc[0]), bool(marked["is_super"].iloc[0])
    tokens = store.df("SELECT DISTINCT token_index FROM expert_max WHERE layer = ? AND expert = ? ORDER BY 1", [layer, expert])
    return layer, expert, is_super, tokens["token_index"].tolist()


def _moe(root: Path) -> Store:
    store = capture(moe_handle(), root, ["experts", "sinks", "routing", "lazy"], tokens=1000, ctx=48, batch_size=8)
    massive = massive_tokens(store)
    later = store.df("SELECT token_index FROM tokens WHERE pos > 0 ORDER BY token_index LIMIT 30")["token_index"].tolist()
    firing = {0: routed_expert(store)[1], 1: massive, 2: later, 3: super_expert(store)[3]}
    plant_features(store, "planted", random_sae(root / "sae-planted", 8), firing, d_sae=8)
    run_links(store, "planted", None)
    return store


@dataclass(frozen=True)
class LinkStores:
    dense: Store
    moe: Store


def link_stores(base: Path) -> LinkStores:
    """Both stores, built once under base per session (the link tests and the page tests share them)."""
    root = base / "link-stores"
    if not (root / "built").exists():
        shutil.rmtree(root, ignore_errors=True)
        (root / "dense").mkdir(parents=True)
        (root / "moe").mkdir()
        _dense(root / "dense")
        _moe(root / "moe")
        (root / "built").touch()
    return LinkStores(Store.open(root / "dense" / "store"), Store.open(root / "moe" / "store"))
