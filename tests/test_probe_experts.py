"""Super-expert probe and analysis: maxima against a direct computation, a planted super expert,
massive activations against NumPy, and fused transformers-5 experts against their own forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.phenomena_models import VOCAB, capture, handle_for, moe_config, stored_ids
from workbench.analysis.super_experts import analyze_experts, expert_maxima, expert_top_tokens, massive_activations
from workbench.capture.probes.moe_layers import (
    ExpertOutputs,
    RoutedBatch,
    find_moe_layers,
    record_expert_outputs,
    record_routing,
)  # fmt: skip

CTX, BATCH, TOKENS = 48, 2, 200


@torch.inference_mode()
def test_expert_maxima_and_residual_extremes_match_a_direct_computation(tmp_path):
    handle = handle_for(moe_config(n_layers=2, seed=4))
    store = capture(handle, tmp_path, ["experts"], tokens=TOKENS, ctx=CTX, batch_size=BATCH)
    ids = stored_ids(store, CTX)
    hooks = [f"blocks.{l}.ln2.hook_normalized" for l in range(2)] + [f"blocks.{l}.hook_resid_post" for l in range(2)]
    cache = handle.run(ids, hooks)
    maxima = expert_maxima(store).set_index(["layer", "expert"])
    for layer in range(2):
        moe = handle.model.blocks[layer].mlp
        x = cache[f"blocks.{layer}.ln2.hook_normalized"].reshape(-1, 32)[:TOKENS]
        chosen = torch.topk(torch.softmax(moe.W_gate(x), dim=-1), 2, dim=-1).indices
        for e, expert in enumerate(moe.experts):
            out = expert.W_out(F.silu(expert.W_gate(x)) * expert.W_in(x)).abs()  # every token, then keep routed ones
            routed = (chosen == e).any(-1)
            if not routed.any():
                continue
            peak = out[routed].max(-1).values
            row = maxima.loc[(layer, e)]
            assert float(row["a"]) == pytest.approx(float(peak.max()), rel=1e-5)
            assert int(row["routed"]) == int(routed.sum())
            assert int(row["token_index"]) == int(torch.nonzero(routed)[:, 0][peak.argmax()])
    massive = massive_activations(store).set_index("layer")
    whole = TOKENS // CTX  # samples cut short are left out of the per-sample statistics
    for layer in range(2):
        h = cache[f"blocks.{layer}.hook_resid_post"][:whole].abs().reshape(whole, -1).numpy()
        top = -np.sort(-h, axis=1)[:, :3]
        for r in range(3):
            assert massive.loc[layer, f"top{r + 1}"] == pytest.approx(top[:, r].mean(), rel=1e-5)
        lower_median = np.sort(h, axis=1)[:, (h.shape[1] - 1) // 2]  # torch.median's convention
        assert massive.loc[layer, "median"] == pytest.approx(lower_median.mean(), rel=1e-5)


def test_planted_expert_emitting_outliers_on_one_token_is_the_only_super_expert(tmp_path):
    handle = handle_for(moe_config(n_layers=4, seed=5))
    target, layer, expert = VOCAB["e"], 0, 2
    with torch.no_grad():
        model = handle.model
        model.W_E[:, 0] = 0.0
        model.W_E[target, 0] = 1.0  # only the token "e" carries channel 0 into layer 0's MoE
        model.blocks[0].attn.W_O[:, :, 0] = 0.0
        model.blocks[0].attn.b_O[0] = 0.0
        moe = model.blocks[layer].mlp
        moe.W_gate.weight[expert, 0] = 50.0  # "e" always goes to the planted expert
        planted = moe.experts[expert]
        for linear in (planted.W_in, planted.W_gate, planted.W_out):
            linear.weight.zero_()
        planted.W_in.weight[0, 0] = 5.0
        planted.W_gate.weight[0, 0] = 5.0
        planted.W_out.weight[7, 0] = 20.0  # hidden unit 0 -> output channel 7; zero for every other token
    store = capture(handle, tmp_path, ["experts"], tokens=288)
    result = analyze_experts(store)
    assert list(zip(result["super"]["layer"], result["super"]["expert"])) == [(layer, expert)]
    assert result["super"]["token"].tolist() == ["e"]
    assert int(result["super"]["channel"][0]) == 7
    tops = expert_top_tokens(store, n=3)
    assert set(tops[(tops["layer"] == layer) & (tops["expert"] == expert)]["token"]) == {"e"}
    massive = result["massive"].set_index("layer")
    assert massive.loc[0, "top1_channel"] == 7 and massive.loc[0, "top1_max_token"] == "e"
    saved = store.df("SELECT layer, expert FROM super_experts WHERE is_super")
    assert list(zip(saved["layer"], saved["expert"])) == [(layer, expert)]


def _tiny_hf_moe(family: str) -> torch.nn.Module:
    import transformers

    common = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, max_position_embeddings=64)  # fmt: skip
    if family == "mixtral":
        config = transformers.MixtralConfig(**common, intermediate_size=16, num_local_experts=4)
        model = transformers.MixtralForCausalLM(config)
    elif family == "olmoe":
        config = transformers.OlmoeConfig(**common, intermediate_size=16, num_experts=4)
        model = transformers.OlmoeForCausalLM(config)
    else:
        config = transformers.Qwen2MoeConfig(**common, intermediate_size=16, moe_intermediate_size=16,
                                             shared_expert_intermediate_size=16, num_experts=4, decoder_sparse_step=1)  # fmt: skip
        model = transformers.Qwen2MoeForCausalLM(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
    return model.eval()


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen2_moe"])
def test_fused_experts_are_recomputed_exactly_and_routing_read_from_the_router(family):
    model = _tiny_hf_moe(family)
    layers = find_moe_layers(model)
    assert [(m.layer, m.n_experts, m.top_k, m.style) for m in layers] == [(0, 4, 2, "fused"), (1, 4, 2, "fused")]
    routed: dict[int, RoutedBatch] = {}
    outputs: dict[int, ExpertOutputs] = {}
    inputs: dict[int, torch.Tensor] = {}
    spies = [m.block.experts.register_forward_hook(lambda mod, args, out, l=m.layer: inputs.__setitem__(l, args[0])) for m in layers]
    ids = torch.randint(0, 60, (2, 9))
    with torch.no_grad(), record_routing(layers, routed), record_expert_outputs(layers, outputs):
        model(ids)
    for spy in spies:
        spy.remove()
    for moe in layers:
        hidden = inputs[moe.layer]
        logits = F.linear(hidden, moe.block.gate.weight)
        torch.testing.assert_close(routed[moe.layer].probs, torch.softmax(logits.float(), -1))
        torch.testing.assert_close(routed[moe.layer].indices, torch.topk(logits, 2, dim=-1).indices)
        for e in range(moe.n_experts):
            tokens = outputs[moe.layer].row_token[e]
            assert sorted(tokens.tolist()) == sorted(torch.nonzero((routed[moe.layer].indices == e).any(-1))[:, 0].tolist())
            if not len(tokens):
                continue
            # the model's own experts forward, asked for expert e alone with weight 1, is the oracle
            alone = moe.block.experts(hidden[tokens], torch.full((len(tokens), 1), e), torch.ones(len(tokens), 1))
            peak, channel = alone.abs().max(-1)
            torch.testing.assert_close(outputs[moe.layer].row_max[e], peak, rtol=1e-5, atol=1e-6)
            assert torch.equal(outputs[moe.layer].row_channel[e], channel)


def test_super_expert_rule_against_numpy_on_random_maxima():
    import pandas as pd

    from workbench.analysis.super_experts import mark_super_experts

    rng = np.random.default_rng(3)
    n_layers, n_experts = 8, 16
    a = rng.lognormal(0, 0.5, (n_layers, n_experts))
    a[1, 4], a[2, 9], a[7, 0] = 60.0, 25.0, 30.0  # early outliers and one in the last quarter (never super)
    frame = pd.DataFrame({"layer": np.repeat(np.arange(n_layers), n_experts), "expert": np.tile(np.arange(n_experts), n_layers), "a": a.reshape(-1)})
    marked = mark_super_experts(frame, n_layers)
    cut = max(np.percentile(a, 99.5), a.max() / 10)
    want = {(l, e) for l in range(n_layers) for e in range(n_experts) if l < 6 and a[l, e] > cut}
    assert set(zip(marked[marked["is_super"]]["layer"], marked[marked["is_super"]]["expert"])) == want == {(1, 4)}
