"""Routing patterns from the `routing` probe (OpenMoE, Xue et al. 2024; phenomena.md section 4).

- load: f_e = share of routing slots going to expert e; coefficient of variation (population
  std / mean), max / mean, normalised entropy H(f) / log E;
- router entropy: mean over tokens of H_t / log E from the router softmax;
- token-ID specialisation: for each token id seen at least `min_count` times, the share of
  its occurrences whose top-k set contains its most common expert, averaged weighted by count
  (= sum of those maxima / sum of counts); the chance level is the same statistic after
  randomly permuting the token ids over the occurrences;
- co-activation: E x E counts of tokens choosing both experts (diagonal: tokens choosing e);
- drop towards the end: capacity C = ceil(cf * N * k / E) per expert and sequence of N
  tokens, slots served in position order (then rank order); a slot arriving when its expert
  already holds C is dropped. Reported as drop ratio per position bucket.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from workbench.capture.probes.registry import require_probe
from workbench.store.reader import Store
from workbench.store.table_group import TableUnit


def load_statistics(slots: np.ndarray) -> dict[str, float]:
    """cv, max_over_mean and normalised entropy of one layer's slots per expert."""
    f = np.asarray(slots, dtype=float)
    f = f / f.sum()
    nz = f[f > 0]
    return {
        "cv": float(f.std() / f.mean()),
        "max_over_mean": float(f.max() / f.mean()),
        "entropy": float(-(nz * np.log(nz)).sum() / math.log(len(f))),
    }


def expert_load(store: Store) -> pd.DataFrame:
    """layer, expert, slots, share: the layer x expert load heatmap."""
    require_probe(store, "routing")
    load = store.df("SELECT layer, expert, sum(slots) AS slots FROM routing_load GROUP BY layer, expert ORDER BY layer, expert")
    load["share"] = load["slots"] / load.groupby("layer")["slots"].transform("sum")
    return load


def load_summary(store: Store) -> pd.DataFrame:
    """layer, cv, max_over_mean, entropy (normalised), router_entropy (mean H_t / log E)."""
    load = expert_load(store)
    rows = [{"layer": int(layer), **load_statistics(g["slots"].to_numpy())} for layer, g in load.groupby("layer")]
    entropy = store.df("SELECT layer, avg(entropy) AS router_entropy FROM routing_entropy GROUP BY layer")
    return pd.DataFrame(rows).merge(entropy, on="layer").sort_values("layer").reset_index(drop=True)


def specialisation_score(token_ids: np.ndarray, experts: np.ndarray, min_count: int) -> tuple[float, int]:
    """(weighted share of occurrences routed to each token's most common expert, token ids used).

    token_ids [n]; experts [n, k] (distinct experts per row).
    """
    ids, inverse, counts = np.unique(token_ids, return_inverse=True, return_counts=True)
    n_experts = int(experts.max()) + 1 if experts.size else 1
    keys = np.repeat(inverse, experts.shape[1]) * n_experts + experts.reshape(-1)
    pair_keys, pair_counts = np.unique(keys, return_counts=True)
    best = np.zeros(len(ids), dtype=np.int64)
    np.maximum.at(best, pair_keys // n_experts, pair_counts)
    used = counts >= min_count
    if not used.any():
        return float("nan"), 0
    return float(best[used].sum() / counts[used].sum()), int(used.sum())


def _layer_routes(store: Store) -> pd.DataFrame:
    """token_index, layer, rank, expert, token_id, seq, pos for every routing slot."""
    return store.df(
        """
        SELECT c.token_index, c.layer, c.rank, c.expert, t.token_id, t.seq, t.pos
        FROM routing_choices AS c JOIN tokens AS t USING (token_index) ORDER BY c.layer, c.token_index, c.rank
        """
    )


def _slot_matrix(routes: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(token ids [n], experts [n, k]) of one layer's slots, sorted by token_index then rank."""
    k = int(routes["rank"].max()) + 1
    experts = routes["expert"].to_numpy().reshape(-1, k)
    return routes["token_id"].to_numpy()[::k], experts


def token_specialisation(store: Store, min_count: int = 5, seed: int = 0) -> pd.DataFrame:
    """layer, specialisation, chance (shuffled token ids), token_ids (how many passed min_count)."""
    require_probe(store, "routing")
    rng = np.random.default_rng(seed)
    rows = []
    for layer, routes in _layer_routes(store).groupby("layer"):
        ids, experts = _slot_matrix(routes)
        score, used = specialisation_score(ids, experts, min_count)
        chance, _ = specialisation_score(rng.permutation(ids), experts, min_count)
        rows.append({"layer": int(layer), "specialisation": score, "chance": chance, "token_ids": used})
    return pd.DataFrame(rows)


def coactivation(store: Store) -> dict[int, pd.DataFrame]:
    """Per layer the symmetric E x E matrix of tokens choosing both experts (diagonal: load)."""
    require_probe(store, "routing")
    pairs = store.df(
        "SELECT layer, expert_a, expert_b, sum(tokens) AS tokens FROM routing_coactivation GROUP BY ALL"
    )
    load = expert_load(store)
    out = {}
    for layer, group in load.groupby("layer"):
        n = int(group["expert"].max()) + 1
        matrix = np.zeros((n, n), dtype=np.int64)
        matrix[group["expert"], group["expert"]] = group["slots"]  # one slot per token and expert
        p = pairs[pairs["layer"] == layer]
        matrix[p["expert_a"], p["expert_b"]] = p["tokens"]
        matrix[p["expert_b"], p["expert_a"]] = p["tokens"]
        out[int(layer)] = pd.DataFrame(matrix)
    return out


def simulate_drops(seq: np.ndarray, pos: np.ndarray, rank: np.ndarray, expert: np.ndarray,
                   k: int, n_experts: int, capacity_factor: float) -> np.ndarray:  # fmt: skip
    """Dropped flag of every slot under capacity ceil(cf * N_seq * k / E), served by (pos, rank)."""
    frame = pd.DataFrame({"seq": seq, "pos": pos, "rank": rank, "expert": expert, "slot": np.arange(len(seq))})
    tokens = frame[frame["rank"] == 0].groupby("seq")["pos"].size()
    capacity = np.ceil(capacity_factor * tokens * k / n_experts)
    frame = frame.sort_values(["seq", "expert", "pos", "rank"])
    queue = frame.groupby(["seq", "expert"]).cumcount().to_numpy()
    dropped = np.zeros(len(seq), dtype=bool)
    dropped[frame["slot"].to_numpy()] = queue >= capacity.reindex(frame["seq"]).to_numpy()
    return dropped


def drop_by_position(store: Store, capacity_factor: float = 1.0, buckets: int = 8) -> pd.DataFrame:
    """layer, bucket, pos_from, pos_to, slots, dropped, drop_ratio under simulated capacity."""
    require_probe(store, "routing")
    routes = _layer_routes(store)
    ctx = int(routes["pos"].max()) + 1
    rows = []
    for layer, r in routes.groupby("layer"):
        k = int(r["rank"].max()) + 1
        n_experts = int(store.df("SELECT count(DISTINCT expert) AS n FROM routing_load WHERE layer = ?", [int(layer)])["n"][0])
        dropped = simulate_drops(r["seq"].to_numpy(), r["pos"].to_numpy(), r["rank"].to_numpy(), r["expert"].to_numpy(),
                                 k, n_experts, capacity_factor)  # fmt: skip
        bucket = r["pos"].to_numpy() * buckets // ctx
        for b in range(buckets):
            sel = bucket == b
            if sel.any():
                rows.append({
                    "layer": int(layer), "bucket": b, "pos_from": b * ctx // buckets, "pos_to": (b + 1) * ctx // buckets - 1,
                    "slots": int(sel.sum()), "dropped": int(dropped[sel].sum()), "drop_ratio": float(dropped[sel].mean()),
                })  # fmt: skip
    return pd.DataFrame(rows)


def analyze_routing(store: Store, min_count: int = 5, capacity_factor: float = 1.0) -> dict[str, pd.DataFrame]:
    """Load, entropy, specialisation, co-activation and drops; persisted as routing_* tables."""
    summary = load_summary(store).merge(token_specialisation(store, min_count), on="layer")
    load = expert_load(store)
    drops = drop_by_position(store, capacity_factor)
    pairs = pd.concat(
        [m.stack().rename_axis(["expert_a", "expert_b"]).reset_index(name="tokens").assign(layer=layer)
         for layer, m in coactivation(store).items()],
        ignore_index=True,
    )  # fmt: skip
    with TableUnit(store.root, "analysis_routing") as unit:  # published together
        unit.write_table("routing_summary", summary)
        unit.write_table("routing_expert_load", load)
        unit.write_table("routing_drop_by_position", drops)
        unit.write_table("routing_coactivation_matrix", pairs)
    return {"summary": summary, "load": load, "drops": drops, "coactivation": pairs}
