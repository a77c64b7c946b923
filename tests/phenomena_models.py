"""Tiny models built inside the tests for the phenomenon probes, and a capture into a tmp store.

A character-level tokenizer (made with the `tokenizers` library, no files) lets random
HookedTransformers run through the real capture runner; planted cases then edit their weights.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import PreTrainedTokenizerFast

from workbench import Store
from workbench.capture.runner import CaptureSettings, run_capture
from workbench.models.handle import ModelHandle

BOS = "<bos>"
CHARS = sorted(set(string.ascii_letters + string.digits + string.punctuation + " \n"))
VOCAB = {BOS: 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}

ENGLISH = """\
The river ran quietly past the old mill, and the miller's daughter watched the water turn the
wheel. Every morning she carried flour to the village, where the baker waited at his door.
He would ask about the weather, and she would tell him what the clouds had said at dawn.

In the spring the fields filled with barley and the roads grew soft with rain. Travellers
stopped at the inn to dry their coats, trade news and argue about the price of wool. Some of
them stayed for a week; others left before the sun was up, eager to reach the city.

Scientists have long studied how birds find their way across oceans. Some species follow
the stars, others sense the magnetic field of the earth, and many seem to remember the
smell of the coast. Young birds often fly with older ones on their first journey.

The library opened at nine. Students came in with notebooks and coffee, looking for a quiet
table near the windows. The librarian knew most of them by name, and she kept a list of the
books they asked for, so she could order new copies before the exams began.

A good bread needs only flour, water, salt and time. The dough rests overnight in a cool
room, and in the morning it is shaped, left to rise again and baked in a very hot oven. The
crust should crack a little as it cools, which bakers call the bread singing.

When the storm reached the coast, the fishing boats had already returned to the harbour.
Families gathered in the kitchen, listening to the wind and the radio. By midnight the rain
had stopped, and the next day children ran along the beach collecting shells and driftwood.

Learning a new language takes patience. At first every sentence feels like a puzzle, and
even simple questions require careful thought. After a few months, however, the words begin
to arrive on their own, and one day you notice that you have been dreaming in the new tongue.
"""


def char_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, unk_token="<unk>")


def dense_config(act_fn: str = "relu", n_layers: int = 2, normalization_type: str | None = "LN", seed: int = 0) -> HookedTransformerConfig:
    return HookedTransformerConfig(
        n_layers=n_layers, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_mlp=64, d_vocab=len(VOCAB),
        act_fn=act_fn, normalization_type=normalization_type, seed=seed,
    )  # fmt: skip


def moe_config(n_layers: int = 4, seed: int = 0) -> HookedTransformerConfig:
    return HookedTransformerConfig(
        n_layers=n_layers, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_mlp=32, d_vocab=len(VOCAB),
        act_fn="silu", gated_mlp=True, num_experts=4, experts_per_token=2, normalization_type="RMS",
        positional_embedding_type="rotary", seed=seed,
    )  # fmt: skip


def handle_for(cfg: HookedTransformerConfig, name: str = "planted") -> ModelHandle:
    torch.manual_seed(cfg.seed or 0)
    model = HookedTransformer(cfg).eval()
    with torch.no_grad():  # random init leaves biases at zero; small ones make counts less uniform
        for name_, param in model.named_parameters():
            if name_.endswith(("b_in", "b_Q", "b_K")):
                param.normal_(0, 0.1)
    return ModelHandle(
        name=name, model=model, tokenizer=char_tokenizer(), fingerprint=f"{name}-{cfg.seed}", kind="decoder",
        prefix_ids=[VOCAB[BOS]], n_layers=cfg.n_layers, d_model=cfg.d_model,
    )  # fmt: skip


def plant_sink_head(handle: ModelHandle, layer: int, head: int) -> None:
    """Make head (layer, head) of a dense model without normalisation put all its attention on
    the first position: only [BOS] carries residual channel 0 (layer 0 writes nothing there), the
    head's keys read channel 0 and every query looks for it."""
    with torch.no_grad():
        model = handle.model
        model.W_E[:, 0] = 0.0
        model.W_E[VOCAB[BOS], 0] = 10.0
        model.W_pos[:, 0] = 0.0
        model.blocks[0].attn.W_O[:, :, 0] = 0.0
        model.blocks[0].attn.b_O[0] = 0.0
        model.blocks[0].mlp.W_out[:, 0] = 0.0
        model.blocks[0].mlp.b_out[0] = 0.0
        attn = model.blocks[layer].attn
        attn.W_K[head] = 0.0
        attn.W_K[head, 0, 0] = 1.0  # keys: 10 on [BOS], 0 elsewhere
        attn.b_K[head] = 0.0
        attn.W_Q[head] = 0.0
        attn.b_Q[head] = 0.0
        attn.b_Q[head, 0] = 10.0


def capture(handle: ModelHandle, folder: Path, probes: list[str], tokens: int = 600, ctx: int = 48, batch_size: int = 4,
            text: str = ENGLISH, hooks: list[str] | None = None) -> Store:  # fmt: skip
    """Capture the probes through the real runner into folder/store and open the store."""
    data = folder / "text.txt"
    data.write_text(text * 3)
    store = folder / "store"
    run_capture(
        CaptureSettings(model=handle.name, data=str(data), hooks=hooks or [], tokens=tokens, ctx=ctx,
                        batch_size=batch_size, store=str(store), probes=probes),
        handle=handle, progress=False,
    )  # fmt: skip
    return Store.open(store)


def stored_ids(store: Store, ctx: int) -> torch.Tensor:
    """Token ids of the store's windows [n_windows, ctx] (the last window may be partial: padded with 0)."""
    tokens = store.tokens()
    ids = torch.zeros((len(tokens) + ctx - 1) // ctx * ctx, dtype=torch.long)
    ids[: len(tokens)] = torch.tensor(tokens["token_id"].values)
    return ids.view(-1, ctx)
