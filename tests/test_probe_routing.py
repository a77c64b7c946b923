"""Routing probe and analysis: rows, entropy, load and co-activation against NumPy; a token-id router
specialises fully while a random router sits at the shuffled-id chance level; simulated drops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.phenomena_models import capture, handle_for, moe_config, stored_ids
from workbench.analysis.routing import (
    analyze_routing,
    coactivation,
    load_statistics,
    load_summary,
    simulate_drops,
    specialisation_score,
    token_specialisation,
)  # fmt: skip

CTX, BATCH, TOKENS = 48, 2, 200


@torch.inference_mode()
def test_routing_rows_entropy_load_and_coactivation_match_numpy(tmp_path):
    handle = handle_for(moe_config(n_layers=2, seed=6))
    store = capture(handle, tmp_path, ["routing"], tokens=TOKENS, ctx=CTX, batch_size=BATCH)
    ids = stored_ids(store, CTX)
    hooks = [f"blocks.{l}.mlp.hook_expert_{w}" for l in range(2) for w in ("weights", "indices")]
    cache = handle.run(ids, hooks)
    summary = load_summary(store).set_index("layer")
    matrices = coactivation(store)
    for layer in range(2):
        probs = cache[f"blocks.{layer}.mlp.hook_expert_weights"][:TOKENS].numpy()
        chosen = cache[f"blocks.{layer}.mlp.hook_expert_indices"][:TOKENS].numpy()
        rows = store.df("SELECT token_index, rank, expert, weight, prob FROM routing_choices WHERE layer = ? ORDER BY token_index, rank", [layer])
        np.testing.assert_array_equal(rows["expert"].to_numpy().reshape(-1, 2), chosen)
        np.testing.assert_allclose(rows["prob"].to_numpy().reshape(-1, 2), np.take_along_axis(probs, chosen, 1), rtol=1e-6)
        entropy = store.df("SELECT entropy FROM routing_entropy WHERE layer = ? ORDER BY token_index", [layer])["entropy"]
        np.testing.assert_allclose(entropy, -(probs * np.log(probs)).sum(1) / math.log(4), rtol=1e-5)
        onehot = np.zeros((TOKENS, 4), dtype=np.int64)
        np.put_along_axis(onehot, chosen, 1, axis=1)
        np.testing.assert_array_equal(matrices[layer].to_numpy(), onehot.T @ onehot)
        f = onehot.sum(0) / onehot.sum()
        assert summary.loc[layer, "cv"] == pytest.approx(f.std() / f.mean())
        assert summary.loc[layer, "max_over_mean"] == pytest.approx(f.max() / f.mean())
        assert summary.loc[layer, "entropy"] == pytest.approx(-(f * np.log(f)).sum() / math.log(4))
        assert summary.loc[layer, "router_entropy"] == pytest.approx(entropy.mean(), rel=1e-5)


def test_token_id_router_specialises_fully_and_random_router_sits_at_chance(tmp_path):
    handle = handle_for(moe_config(n_layers=2, seed=7))
    with torch.no_grad():
        # layer 0's attention writes nothing, so its router sees only RMSNorm(embedding of the token)
        handle.model.blocks[0].attn.W_O.zero_()
        handle.model.blocks[0].attn.b_O.zero_()
    generator = torch.Generator().manual_seed(0)

    def random_router(module, args, logits):  # layer 1 routes by coin flips, whatever the token
        return torch.randn(logits.shape, generator=generator) * 3

    hook = handle.model.blocks[1].mlp.W_gate.register_forward_hook(random_router)
    try:
        store = capture(handle, tmp_path, ["routing"], tokens=1440)
    finally:
        hook.remove()
    spec = token_specialisation(store, min_count=5).set_index("layer")
    assert spec.loc[0, "specialisation"] == 1.0
    assert spec.loc[0, "chance"] < 0.9
    assert spec.loc[1, "specialisation"] == pytest.approx(spec.loc[1, "chance"], abs=0.04)
    result = analyze_routing(store)
    assert set(result["summary"]["layer"]) == {0, 1}
    assert set(store.df("SELECT DISTINCT layer FROM routing_drop_by_position")["layer"]) == {0, 1}


def test_specialisation_score_matches_a_plain_count():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 12, 500)
    experts = np.stack([rng.choice(6, 2, replace=False) for _ in ids])
    got, used = specialisation_score(ids, experts, min_count=40)
    top, total, n = 0, 0, 0
    for token in np.unique(ids):
        rows = experts[ids == token]
        if len(rows) < 40:
            continue
        top += max((rows == e).any(1).sum() for e in range(6))
        total += len(rows)
        n += 1
    assert (got, used) == (pytest.approx(top / total), n)
    assert load_statistics(np.array([1, 1, 1, 1]))["cv"] == 0.0
    assert load_statistics(np.array([4, 0, 0, 0]))["entropy"] == 0.0


def test_simulated_drops_follow_capacity_in_position_order():
    rng = np.random.default_rng(2)
    seqs, positions, k, n_experts, cf = 3, 16, 2, 4, 1.0
    seq = np.repeat(np.arange(seqs), positions * k)
    pos = np.tile(np.repeat(np.arange(positions), k), seqs)
    rank = np.tile(np.arange(k), seqs * positions)
    expert = np.concatenate([rng.choice(n_experts, k, replace=False, p=[0.55, 0.25, 0.15, 0.05]) for _ in range(seqs * positions)])
    order = rng.permutation(len(seq))  # input order must not matter
    got = simulate_drops(seq[order], pos[order], rank[order], expert[order], k, n_experts, cf)
    capacity = math.ceil(cf * positions * k / n_experts)
    expected = np.zeros(len(seq), dtype=bool)
    for s in range(seqs):
        held = [0] * n_experts
        for i in np.nonzero(seq == s)[0]:  # already in (pos, rank) order
            if held[expert[i]] >= capacity:
                expected[i] = True
            else:
                held[expert[i]] += 1
    np.testing.assert_array_equal(got, expected[order])
    assert expected[pos >= positions // 2].mean() > expected[pos < positions // 2].mean()
