"""Lazy-neuron probe and analysis: counts against NumPy, planted dead/dense neurons, probe selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.phenomena_models import capture, dense_config, handle_for, moe_config, stored_ids
from workbench.analysis.lazy_neurons import (
    active_percent_by_layer,
    analyze_lazy,
    expert_neuron_frequencies,
    has_expert_rows,
    neuron_top_tokens,
)
from workbench.capture.probes.lazy_neurons import LazyNeuronProbe, dropped_output_norm
from workbench.capture.probes.registry import make_probes
from workbench.errors import WorkbenchError

CTX, BATCH, TOKENS = 48, 2, 200  # 200 tokens: the last window is cut short, so `keep` matters


def _direct_acts(handle, store) -> dict[int, np.ndarray]:
    """Post-activations of the stored tokens, recomputed by a plain forward pass: layer -> [tokens, d_mlp]."""
    ids = stored_ids(store, CTX)
    hooks = [f"blocks.{l}.mlp.hook_post" for l in range(handle.n_layers)]
    cache = handle.run(ids, hooks)
    return {l: cache[h].reshape(-1, cache[h].shape[-1])[:TOKENS].numpy() for l, h in enumerate(hooks)}


def test_gelu_counts_fractions_and_cett_match_numpy(tmp_path):
    handle = handle_for(dense_config("gelu"))
    store = capture(handle, tmp_path, ["lazy"], tokens=TOKENS, ctx=CTX, batch_size=BATCH)
    acts = _direct_acts(handle, store)
    counts = store.df("SELECT layer, rule, neuron, sum(fired) AS fired, sum(tokens) AS n FROM lazy_neuron_counts GROUP BY ALL")
    thresholds = store.df("SELECT batch, layer, threshold, cett FROM lazy_cett_threshold ORDER BY batch, layer")
    per_batch = BATCH * CTX
    for layer, a in acts.items():
        w_norm = handle.model.blocks[layer].mlp.W_out.detach().norm(dim=1).numpy()
        cett_active = np.zeros_like(a, dtype=bool)
        for _, t in thresholds[thresholds["layer"] == layer].iterrows():
            rows = slice(int(t["batch"]) * per_batch, (int(t["batch"]) + 1) * per_batch)
            cett_active[rows] = np.abs(a[rows]) * w_norm >= t["threshold"]
            # the threshold leaves about 20% of the MLP output norm in the dropped neurons
            reached = dropped_output_norm(torch.tensor(a[rows]), handle.model.blocks[layer].mlp.W_out.detach(), float(t["threshold"]))
            assert reached == pytest.approx(0.2, abs=0.03)
        expected = {"zero": a != 0, "fat": np.abs(a) >= 1e-2, "cett": cett_active}
        for rule, active in expected.items():
            got = counts[(counts["layer"] == layer) & (counts["rule"] == rule)].sort_values("neuron")
            np.testing.assert_array_equal(got["fired"].to_numpy(), active.sum(0))
            assert (got["n"] == TOKENS).all()
            frac = store.df(
                "SELECT active_frac FROM lazy_token_activity WHERE layer = ? AND rule = ? ORDER BY token_index", [layer, rule]
            )["active_frac"].to_numpy()
            np.testing.assert_allclose(frac, active.mean(1), rtol=1e-6)
        pct = active_percent_by_layer(store)
        row = pct[(pct["layer"] == layer) & (pct["rule"] == "fat")]
        assert float(row["pct_active"].iloc[0]) == pytest.approx(100 * expected["fat"].mean())
        top = neuron_top_tokens(store, layer, 3, n=1)
        assert float(top["value"][0]) == pytest.approx(a[:, 3].max(), rel=1e-5)
        assert int(top["token_index"][0]) == int(a[:, 3].argmax())


def test_planted_dead_and_always_on_neurons_are_exactly_the_ones_listed(tmp_path):
    # one layer: in a random model's deeper layers a shared residual direction makes some
    # neurons fire on ~99% of tokens by themselves, which would blur "exactly the planted ones"
    handle = handle_for(dense_config("relu", n_layers=1))
    dead = {(0, 3), (0, 17), (0, 40)}
    dense = {(0, 5), (0, 0), (0, 63)}
    with torch.no_grad():
        for block in handle.model.blocks:
            block.mlp.b_in.zero_()  # no natural neuron starts close to always-on or never-on
        for layer, neuron in dead:
            handle.model.blocks[layer].mlp.b_in[neuron] = -100.0
        for layer, neuron in dense:
            handle.model.blocks[layer].mlp.b_in[neuron] = 100.0
            handle.model.blocks[layer].mlp.W_out[neuron] = 0.0  # on everywhere, but leaves the residual alone
    store = capture(handle, tmp_path, ["lazy"], tokens=600)
    result = analyze_lazy(store)
    assert set(result["by_layer"]["rule"]) == {"zero"}  # ReLU: exact zeros only
    assert set(zip(result["dead"]["layer"], result["dead"]["neuron"])) == dead
    assert set(zip(result["dense"]["layer"], result["dense"]["neuron"])) == dense
    saved = store.df("SELECT layer, neuron FROM lazy_neuron_frequency WHERE dead")
    assert set(zip(saved["layer"], saved["neuron"])) == dead


def test_probe_selection_all_skips_what_does_not_apply_and_explicit_names_fail_loudly():
    dense = handle_for(dense_config("relu"))
    moe = handle_for(moe_config(n_layers=2))
    assert [p.name for p in make_probes(["all"], dense)] == ["lazy", "sinks"]
    assert [p.name for p in make_probes(["all"], moe)] == ["lazy", "experts", "sinks", "routing"]
    with pytest.raises(WorkbenchError, match="probe 'experts' cannot run: model planted has no mixture-of-experts"):
        make_probes(["experts"], dense)
    with pytest.raises(WorkbenchError, match="unknown probe 'neurons'"):
        make_probes(["neurons"], dense)
    assert LazyNeuronProbe(dense).rules == ["zero"]


@torch.inference_mode()
def test_moe_expert_counts_match_a_direct_computation_over_routed_tokens(tmp_path):
    handle = handle_for(moe_config(n_layers=2, seed=3))
    unrouted, dead = (1, 3), (0, 2, 5)  # (layer, expert), (layer, expert, neuron)
    # the router never picks expert 3 of layer 1: its softmax weight is zeroed before top-k
    silence = torch.ones(4)
    silence[unrouted[1]] = 0.0
    handle.model.add_hook(f"blocks.{unrouted[0]}.mlp.hook_expert_weights", lambda probs, hook: probs * silence, is_permanent=True)
    handle.model.blocks[dead[0]].mlp.experts[dead[1]].W_gate.weight[dead[2]] = 0.0  # silu(0) * up = 0 exactly
    store = capture(handle, tmp_path, ["lazy"], tokens=TOKENS, ctx=CTX, batch_size=BATCH)
    ids = stored_ids(store, CTX)
    hooks = [f"blocks.{l}.{h}" for l in range(2) for h in ("ln2.hook_normalized", "mlp.hook_expert_indices")]
    cache = handle.run(ids, hooks)
    counts = store.df("SELECT layer, expert, rule, neuron, sum(fired) AS fired, sum(tokens) AS n FROM lazy_expert_counts GROUP BY ALL")
    thresholds = store.df("SELECT batch, layer, expert, threshold FROM lazy_expert_cett_threshold")
    per_batch = BATCH * CTX
    for layer in range(2):
        x = cache[f"blocks.{layer}.ln2.hook_normalized"].reshape(-1, 32)[:TOKENS]
        chosen = cache[f"blocks.{layer}.mlp.hook_expert_indices"].reshape(-1, 2)[:TOKENS]
        fired_per_token = torch.zeros(TOKENS)
        for e, expert in enumerate(handle.model.blocks[layer].mlp.experts):
            routed = torch.nonzero((chosen == e).any(-1))[:, 0]
            hidden = torch.nn.functional.silu(expert.W_gate(x[routed])) * expert.W_in(x[routed])
            w_norm = expert.W_out.weight.norm(dim=0)
            cett = torch.zeros_like(hidden, dtype=torch.bool)
            for _, t in thresholds[(thresholds["layer"] == layer) & (thresholds["expert"] == e)].iterrows():
                rows = (routed // per_batch) == int(t["batch"])
                cett[rows] = hidden[rows].abs() * w_norm >= t["threshold"]
            expected = {"zero": hidden != 0, "fat": hidden.abs() >= 1e-2, "cett": cett}
            for rule, active in expected.items():
                got = counts[(counts["layer"] == layer) & (counts["expert"] == e) & (counts["rule"] == rule)].sort_values("neuron")
                np.testing.assert_array_equal(got["fired"].to_numpy(), active.sum(0).numpy())
                assert (got["n"] == len(routed)).all()
            fired_per_token.index_add_(0, routed, expected["fat"].sum(1).float())
        frac = store.df("SELECT active_frac FROM lazy_token_activity WHERE layer = ? AND rule = 'fat' ORDER BY token_index", [layer])
        np.testing.assert_allclose(frac["active_frac"].to_numpy(), (fired_per_token / (2 * 32)).numpy(), rtol=1e-6)
    assert store.df("SELECT count(*) AS n FROM lazy_neuron_counts")["n"][0] == 0  # no dense MLP
    result = analyze_lazy(store)
    zero = result["expert_frequencies"].query("rule == 'zero'")
    assert {(r.layer, r.expert) for r in zero.itertuples() if r.state == "unrouted"} == {unrouted}
    assert {(r.layer, r.expert, r.neuron) for r in zero.itertuples() if r.state == "dead"} == {dead}
    summary = store.df("SELECT layer, expert, routed, unrouted FROM lazy_expert_summary WHERE rule = 'zero' AND unrouted > 0")
    assert list(zip(summary["layer"], summary["expert"], summary["routed"], summary["unrouted"])) == [(*unrouted, 0, 32)]


def test_expert_rows_are_absent_not_an_error_on_dense_stores(tmp_path):
    store = capture(handle_for(dense_config("relu", n_layers=1)), tmp_path, ["lazy"], tokens=100)
    assert not has_expert_rows(store)
    assert "experts" not in analyze_lazy(store)
    with pytest.raises(WorkbenchError, match="has no expert rows"):
        expert_neuron_frequencies(store)
