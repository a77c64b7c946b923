"""The MoE probes through the real loaders: tiny Mixtral / OLMoE / Qwen-MoE folders booted as
TransformerBridge models, captured with --probes all, checked against the router and the
per-expert recomputation (outputs and hidden neurons) that the loader's MoE layout describes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.phenomena_models import ENGLISH
from tests.tiny_checkpoints import build_tiny_checkpoint
from workbench import Store
from workbench.analysis.super_experts import expert_maxima
from workbench.capture.runner import CaptureSettings, run_capture
from workbench.models.registry import load_model

CTX, TOKENS = 32, 256


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen_moe", "qwen3_moe"])
def test_bridge_moe_capture_matches_router_and_expert_recomputation(tmp_path, family):
    handle = load_model(str(build_tiny_checkpoint(family, tmp_path / family)))
    (tmp_path / "text.txt").write_text(ENGLISH)
    run_capture(
        CaptureSettings(model=handle.name, data=str(tmp_path / "text.txt"), hooks=[], tokens=TOKENS, ctx=CTX,
                        batch_size=4, store=str(tmp_path / "s"), probes=["all"]),
        handle=handle, progress=False,
    )  # fmt: skip
    store = Store.open(tmp_path / "s")
    assert store.info()["probes"] == ["lazy", "experts", "sinks", "routing"]
    ids = torch.tensor(store.tokens()["token_id"].values).view(-1, CTX)
    layouts = handle.extra["moe"]
    cache = handle.run(ids, [h for lay in layouts for h in (lay.router_input_hook, lay.router_logits_hook)])
    maxima = expert_maxima(store).set_index(["layer", "expert"])
    lazy = store.df("SELECT layer, expert, neuron, fired, tokens FROM lazy_expert_counts WHERE rule = 'fat'")
    for lay in layouts:
        x = cache[lay.router_input_hook].reshape(-1, handle.d_model)
        chosen = torch.topk(cache[lay.router_logits_hook].reshape(-1, lay.n_experts), lay.top_k, dim=-1).indices
        rows = store.df("SELECT expert FROM routing_choices WHERE layer = ? ORDER BY token_index, rank", [lay.layer])
        assert torch.equal(torch.tensor(rows["expert"].values).view(-1, lay.top_k), chosen)
        for e in range(lay.n_experts):
            routed = (chosen == e).any(-1)
            # the lazy probe counts the expert's hidden neurons over exactly these routed tokens
            experts = lay.experts(handle.model)
            gate, up = F.linear(x[routed], experts.gate_up_proj[e]).chunk(2, dim=-1)
            hidden = experts.act_fn(gate) * up
            got = lazy[(lazy["layer"] == lay.layer) & (lazy["expert"] == e)].groupby("neuron")[["fired", "tokens"]].sum()
            assert (got["tokens"] == int(routed.sum())).all() and len(got) == lay.d_expert
            assert got["fired"].tolist() == (hidden.abs() >= 1e-2).sum(0).tolist()
            if not routed.any():
                continue
            peak = lay.expert_output(handle.model, x[routed], e).abs().max()
            assert float(maxima.loc[(lay.layer, e), "a"]) == pytest.approx(float(peak), rel=1e-4)
