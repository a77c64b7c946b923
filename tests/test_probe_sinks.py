"""Attention-sink probe and analysis: alpha, Sink_1 and hidden sinks against NumPy; a planted sink head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.phenomena_models import capture, dense_config, handle_for, plant_sink_head, stored_ids
from workbench.analysis.attention_sinks import analyze_sinks, key_importance, sink_heads, sink_rate
from workbench.capture.probes.attention_sinks import key_importance as reduce_keys

CTX, BATCH, TOKENS = 48, 2, 200


def _numpy_alpha(pattern: np.ndarray, kept: np.ndarray, causal: bool) -> tuple[np.ndarray, np.ndarray]:
    """Straight from the definition, one sample at a time: (alpha [S, H, T], queries [S, T])."""
    samples, heads, t_len, _ = pattern.shape
    alpha = np.zeros((samples, heads, t_len))
    queries = np.zeros((samples, t_len))
    for s in range(samples):
        for k in range(t_len):
            if not kept[s, k]:
                continue
            seen_by = [t for t in range(t_len) if kept[s, t] and (t >= k or not causal)]
            queries[s, k] = len(seen_by)
            alpha[s, :, k] = pattern[s][:, seen_by, k].sum(-1) / len(seen_by)
    return alpha, queries


def test_alpha_sink_rate_and_hidden_sinks_match_numpy(tmp_path):
    handle = handle_for(dense_config("relu", seed=3))
    store = capture(handle, tmp_path, ["sinks"], tokens=TOKENS, ctx=CTX, batch_size=BATCH)
    ids = stored_ids(store, CTX)
    kept = (torch.arange(ids.numel()) < TOKENS).view(ids.shape).numpy()
    hooks = [f"blocks.{l}.attn.hook_pattern" for l in range(handle.n_layers)]
    cache = handle.run(ids, hooks)
    got = key_importance(store)
    hidden = store.df("SELECT layer, head, token_index, alpha FROM sink_hidden ORDER BY layer, head, token_index")
    for layer, hook in enumerate(hooks):
        alpha, queries = _numpy_alpha(cache[hook].numpy(), kept, causal=True)
        expected = (alpha * queries[:, None, :]).sum(0) / queries.sum(0)  # exact pooled alpha
        mine = got[got["layer"] == layer].pivot(index="head", columns="pos", values="alpha").to_numpy()
        np.testing.assert_allclose(mine, expected, rtol=1e-5, atol=1e-7)
        for eps in (0.1, 0.3):
            rate = sink_rate(store, eps)
            whole = kept[:, 0]
            want = 100 * (alpha[whole][:, :, 0] > eps).mean()
            assert float(rate[rate["layer"] == str(layer)]["sink_rate"].iloc[0]) == pytest.approx(want)
        s, h, k = np.nonzero((alpha > 0.1) & kept[:, None, :] & (np.arange(CTX) > 0))
        mine_hidden = hidden[hidden["layer"] == layer]
        assert sorted(zip(mine_hidden["head"], mine_hidden["token_index"])) == sorted(zip(h, s * CTX + k))
        np.testing.assert_allclose(np.sort(mine_hidden["alpha"]), np.sort(alpha[s, h, k]), rtol=1e-5)


def test_encoder_importance_averages_over_all_queries():
    torch.manual_seed(0)
    pattern = torch.softmax(torch.randn(3, 2, 6, 6), dim=-1)
    keep = torch.ones(3, 6, dtype=torch.bool)
    keep[2, 4:] = False
    sums, queries = reduce_keys(pattern, keep, causal=False)
    alpha, n = _numpy_alpha(pattern.numpy(), keep.numpy(), causal=False)
    np.testing.assert_allclose(queries.numpy(), n)
    np.testing.assert_allclose((sums / queries[:, None, :].clamp_min(1)).numpy(), alpha, rtol=1e-6)


def test_head_forced_onto_the_first_position_is_a_sink(tmp_path):
    handle = handle_for(dense_config("relu", normalization_type=None, seed=1))
    layer, head = 1, 2
    plant_sink_head(handle, layer, head)
    store = capture(handle, tmp_path, ["sinks"], tokens=480)
    result = analyze_sinks(store)
    first = result["alpha_first"].set_index(["layer", "head"])["alpha_1"]
    assert first[(layer, head)] > 0.99
    assert (layer, head) in set(zip(sink_heads(store)["layer"], sink_heads(store)["head"]))
    rate = result["rate"].set_index("layer")["sink_rate"]
    assert rate[str(layer)] >= 25.0  # one head of four is a sink in every sample
    saved = store.df("SELECT alpha_1 FROM sink_alpha_first WHERE layer = ? AND head = ?", [layer, head])
    assert float(saved["alpha_1"][0]) > 0.99
