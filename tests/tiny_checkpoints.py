"""Tiny Hugging Face checkpoint folders built offline from config classes, for loader and probe tests.

Each folder is what `save_pretrained` writes for a real checkpoint of the family (config.json,
model.safetensors) plus a byte-level BPE tokenizer trained here on a few sentences, so
`workbench.models.registry.load_model(str(folder))` loads it like any downloaded model.
Families: "gpt2" (dense), "mixtral", "olmoe", "qwen_moe" (Qwen2-MoE, with a shared expert),
"qwen3_moe"; the MoE ones have 4 experts, top-2, in every layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

FAMILIES = ("gpt2", "mixtral", "olmoe", "qwen_moe", "qwen3_moe")
MOE_FAMILIES = ("mixtral", "olmoe", "qwen_moe", "qwen3_moe")
N_LAYERS = 2
D_MODEL = 32
N_EXPERTS = 4
TOP_K = 2
END_OF_TEXT = "<|endoftext|>"

TOKENIZER_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Sparse autoencoders find features in the activations of language models.",
    "def add(a, b):\n    return a + b\n",
    "Attention sinks gather on the first token; experts specialise on tokens.",
]


def tiny_tokenizer(vocab_size: int = 320) -> Any:
    """A byte-level BPE PreTrainedTokenizerFast (any text encodes) with <|endoftext|> as BOS, EOS and PAD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[END_OF_TEXT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(TOKENIZER_TEXTS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT
    )


def _model(family: str, vocab_size: int, special_id: int) -> Any:
    import transformers as tf

    ids = dict(bos_token_id=special_id, eos_token_id=special_id, pad_token_id=special_id)
    if family == "gpt2":
        return tf.GPT2LMHeadModel(
            tf.GPT2Config(vocab_size=vocab_size, n_embd=D_MODEL, n_layer=N_LAYERS, n_head=4, n_positions=128, n_ctx=128, **ids)
        )
    common = dict(
        vocab_size=vocab_size, hidden_size=D_MODEL, intermediate_size=64, num_hidden_layers=N_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **ids,
    )  # fmt: skip
    if family == "mixtral":
        return tf.MixtralForCausalLM(tf.MixtralConfig(**common, num_local_experts=N_EXPERTS, num_experts_per_tok=TOP_K))
    if family == "olmoe":
        return tf.OlmoeForCausalLM(tf.OlmoeConfig(**common, num_experts=N_EXPERTS, num_experts_per_tok=TOP_K))
    if family == "qwen_moe":
        config = tf.Qwen2MoeConfig(
            **common, num_experts=N_EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
        )  # fmt: skip
        return tf.Qwen2MoeForCausalLM(config)
    if family == "qwen3_moe":
        config = tf.Qwen3MoeConfig(**common, num_experts=N_EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=16, head_dim=8)
        return tf.Qwen3MoeForCausalLM(config)
    raise ValueError(f"unknown tiny checkpoint family '{family}'; families: {', '.join(FAMILIES)}")


def build_tiny_checkpoint(family: str, folder: Path, seed: int = 0) -> Path:
    """Write a tiny randomly initialised checkpoint of `family` (weights + tokenizer) into `folder`; returns it."""
    folder = Path(folder)
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    model = _model(family, len(tokenizer), tokenizer.convert_tokens_to_ids(END_OF_TEXT)).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
