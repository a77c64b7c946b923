"""Local Hugging Face folders (GPT-2, Mixtral, OLMoE, Qwen-MoE) load offline, hook by TransformerLens names, match HF numerics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.tiny_checkpoints import D_MODEL, FAMILIES, MOE_FAMILIES, N_EXPERTS, N_LAYERS, TOP_K, build_tiny_checkpoint
from workbench.errors import WorkbenchError
from workbench.models.handle import ModelHandle
from workbench.models.registry import load_model

HOOKS = [
    "blocks.0.hook_resid_pre",
    "blocks.0.hook_resid_post",
    "blocks.1.hook_resid_post",
    "blocks.0.attn.hook_pattern",
    "blocks.1.attn.hook_pattern",
    "blocks.0.mlp.hook_post",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {family: build_tiny_checkpoint(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="module")
def handles(folders: dict[str, Path]) -> dict[str, ModelHandle]:
    return {family: load_model(str(folder)) for family, folder in folders.items()}


def sample_tokens(handle: ModelHandle) -> torch.Tensor:
    texts = ["The quick brown fox jumps over the lazy dog.", "def add(a, b): return a + b and more"]
    rows = [handle.prefix_ids + handle.tokenize(text)[:10] for text in texts]
    return torch.tensor(rows)


@pytest.mark.parametrize("family", FAMILIES)
def test_folder_loads_as_decoder_with_bos_frame(family: str, handles: dict[str, ModelHandle]) -> None:
    handle = handles[family]
    eos = handle.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert handle.kind == "decoder"
    assert handle.prefix_ids == [eos] and handle.suffix_ids == []
    assert (handle.n_layers, handle.d_model) == (N_LAYERS, D_MODEL)
    assert len(handle.fingerprint) == 16
    assert set(HOOKS) <= set(handle.hook_names())


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_match_the_hugging_face_forward(family: str, handles: dict[str, ModelHandle], folders: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    handle = handles[family]
    tokens = sample_tokens(handle)
    cache = handle.run(tokens, HOOKS)
    reference = AutoModelForCausalLM.from_pretrained(folders[family], attn_implementation="eager").eval()
    with torch.no_grad():
        out = reference(tokens, output_hidden_states=True, output_attentions=True)
    batch, ctx = tokens.shape
    assert cache["blocks.0.hook_resid_post"].shape == (batch, ctx, D_MODEL)
    # hidden_states[0] is the embedding, [l + 1] block l's output (the last one after the final norm).
    torch.testing.assert_close(cache["blocks.0.hook_resid_pre"], out.hidden_states[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"], out.hidden_states[1], rtol=1e-5, atol=1e-6)
    for layer in range(N_LAYERS):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        assert pattern.shape == (batch, 4, ctx, ctx)
        torch.testing.assert_close(pattern, out.attentions[layer], rtol=1e-5, atol=1e-6)
        assert torch.triu(pattern, diagonal=1).abs().max() == 0  # causal
        torch.testing.assert_close(pattern.sum(-1), torch.ones(batch, 4, ctx))


@pytest.mark.parametrize("family", ["gpt2", "mixtral"])
def test_stop_at_layer_returns_the_same_early_hooks(family: str, handles: dict[str, ModelHandle]) -> None:
    handle = handles[family]
    tokens = sample_tokens(handle)
    hooks = ["blocks.0.hook_resid_post", "blocks.0.attn.hook_pattern"]
    stop = handle.stop_layer_for(hooks)
    assert stop == 1
    early = handle.run(tokens, hooks, stop_at_layer=stop)
    full = handle.run(tokens, hooks)
    for hook in hooks:
        torch.testing.assert_close(early[hook], full[hook])


def test_dense_mlp_hook_post_is_the_hidden_layer(handles: dict[str, ModelHandle]) -> None:
    handle = handles["gpt2"]
    assert handle.hook_shapes(["blocks.0.mlp.hook_post", "blocks.1.hook_resid_post"]) == {
        "blocks.0.mlp.hook_post": (4 * D_MODEL,),
        "blocks.1.hook_resid_post": (D_MODEL,),
    }
    assert "moe" not in handle.extra


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_layout_recomputes_the_fused_experts_output(family: str, handles: dict[str, ModelHandle]) -> None:
    """Router input hook + router + expert_output, weighted by the routing, give what the fused module computed."""
    handle = handles[family]
    layouts = handle.extra["moe"]
    assert [m.layer for m in layouts] == list(range(N_LAYERS))
    layout = layouts[1]
    assert (layout.n_experts, layout.top_k) == (N_EXPERTS, TOP_K)
    assert (layout.shared_expert_path is not None) == (family == "qwen_moe")
    experts = layout.experts(handle.model)
    assert layout.down_proj(handle.model, 3).shape == (D_MODEL, layout.d_expert)

    fused_out: list[torch.Tensor] = []
    hook = experts.register_forward_hook(lambda module, args, output: fused_out.append(output.detach()))
    try:
        cache = handle.run(sample_tokens(handle), [layout.router_input_hook, layout.router_logits_hook])
    finally:
        hook.remove()
    x = cache[layout.router_input_hook]
    with torch.no_grad():
        logits, weights, indices = layout.router(handle.model)(x)
        torch.testing.assert_close(logits, cache[layout.router_logits_hook])
        if layout.norm_topk_prob:
            torch.testing.assert_close(weights.sum(-1), torch.ones(x.shape[0]))
        recomputed = torch.zeros_like(x)
        for expert in range(layout.n_experts):
            weight = (weights * (indices == expert)).sum(-1, keepdim=True)
            recomputed += weight * layout.expert_output(handle.model, x, expert)
    assert fused_out[0].abs().max() > 0
    torch.testing.assert_close(recomputed, fused_out[0], rtol=1e-5, atol=1e-7)


def test_moe_router_renormalisation_follows_the_config(handles: dict[str, ModelHandle]) -> None:
    assert handles["mixtral"].extra["moe"][0].norm_topk_prob is True
    assert handles["olmoe"].extra["moe"][0].norm_topk_prob is False  # OlmoeConfig's default


def test_fingerprint_follows_the_weights(tmp_path: Path, folders: dict[str, Path], handles: dict[str, ModelHandle]) -> None:
    copy = shutil.copytree(folders["gpt2"], tmp_path / "copy")
    other = build_tiny_checkpoint("gpt2", tmp_path / "other", seed=1)
    assert load_model(str(copy)).fingerprint == handles["gpt2"].fingerprint
    assert load_model(str(other)).fingerprint != handles["gpt2"].fingerprint


def _broken_copy(source: Path, target: Path) -> Path:
    return Path(shutil.copytree(source, target))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "config.json").unlink(), "no config.json"),
        (lambda f: (f / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda f: (f / "config.json").write_text(json.dumps({"hidden_size": 4})), "no model_type"),
        (lambda f: (f / "model.safetensors").unlink(), "holds no weights"),
        (lambda f: [(f / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")], "has no tokenizer"),
        (lambda f: open(f / "model.safetensors", "r+b").truncate(100), "cannot load GPT2LMHeadModel"),
    ],
    ids=["no-config", "bad-json", "no-model-type", "no-weights", "no-tokenizer", "truncated-weights"],
)
def test_malformed_folder_is_one_clear_line(tmp_path: Path, folders: dict[str, Path], damage, message: str) -> None:
    folder = _broken_copy(folders["gpt2"], tmp_path / "broken")
    damage(folder)
    with pytest.raises(WorkbenchError, match=message) as info:
        load_model(str(folder))
    assert "\n" not in str(info.value)


def test_unsupported_architecture_is_one_clear_line(tmp_path: Path, folders: dict[str, Path]) -> None:
    from transformers import RobertaConfig, RobertaModel

    folder = tmp_path / "roberta"
    config = RobertaConfig(vocab_size=320, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    RobertaModel(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folders["gpt2"] / name, folder / name)
    with pytest.raises(WorkbenchError, match="RobertaModel .* not supported") as info:
        load_model(str(folder))
    assert "\n" not in str(info.value)
