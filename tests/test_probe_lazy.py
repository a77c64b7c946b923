"""Lazy-neuron probe and analysis: counts against NumPy, planted dead/dense neurons, probe selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.phenomena_models import capture, dense_config, handle_for, moe_config, stored_ids
from workbench.analysis.lazy_neurons import active_percent_by_layer, analyze_lazy, neuron_top_tokens
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
    assert [p.name for p in make_probes(["all"], moe)] == ["experts", "sinks", "routing"]
    with pytest.raises(WorkbenchError, match="probe 'experts' cannot run: model planted has no mixture-of-experts"):
        make_probes(["experts"], dense)
    with pytest.raises(WorkbenchError, match="probe 'lazy' cannot run"):
        make_probes(["lazy", "routing"], moe)
    with pytest.raises(WorkbenchError, match="unknown probe 'neurons'"):
        make_probes(["neurons"], dense)
    assert LazyNeuronProbe(dense).rules == ["zero"]
