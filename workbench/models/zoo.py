"""The built-in zoo: tiny HookedTransformer models this project trains itself and ships as files.

`tiny-relu` is a GPT-2-shaped decoder with ReLU MLPs, so lazy neurons are exact zeros.
`tiny-moe` is Mixtral-shaped: RMSNorm, rotary attention and, in every block, 8 gated-SiLU
experts of which the router picks 2. Both read Python source through a byte-level BPE
tokenizer trained on the builtin corpus (workbench.models.corpus). Their weights, tokenizer
and training record live in data/zoo/<name>/ of the repository, which an installed wheel carries
as workbench/zoo_data/<name>/ (see setup.py), so nothing is downloaded and nothing needs
training before the demo.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.models.handle import ModelHandle


def _zoo_data() -> Path:
    """The zoo folder: workbench/zoo_data in an installed wheel, else data/zoo of the source tree."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "zoo_data"
    return installed if installed.is_dir() else package.parent / "data" / "zoo"


ZOO_DATA = _zoo_data()
BOS, EOS, PAD = "<|bos|>", "<|endoftext|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)  # ids 0, 1, 2 in every zoo tokenizer
VOCAB_SIZE = 4096
WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE, RECORD_FILE = (
    "model.safetensors",
    "config.json",
    "tokenizer.json",
    "training.json",
)


@dataclass(frozen=True)
class ZooSpec:
    """A zoo model's shape and its training recipe (what `workbench zoo train` runs)."""

    name: str
    summary: str
    n_layers: int
    d_model: int
    n_heads: int
    d_mlp: int
    act_fn: str
    normalization_type: str
    positional_embedding_type: str
    num_experts: int | None = None
    experts_per_token: int | None = None
    n_ctx: int = 256
    # training recipe
    steps: int = 6000
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 300
    min_lr_fraction: float = 0.1
    weight_decay: float = 0.1
    router_balance_coef: float = 0.01
    seed: int = 0

    def hooked_config(self, d_vocab: int) -> dict[str, Any]:
        """Keyword arguments of the HookedTransformerConfig this spec describes."""
        config: dict[str, Any] = {
            "model_name": self.name,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "n_heads": self.n_heads,
            "d_head": self.d_model // self.n_heads,
            "d_mlp": self.d_mlp,
            "d_vocab": d_vocab,
            "n_ctx": self.n_ctx,
            "act_fn": self.act_fn,
            "normalization_type": self.normalization_type,
            "positional_embedding_type": self.positional_embedding_type,
            "default_prepend_bos": True,
            "seed": self.seed,
        }
        if self.num_experts:
            config.update(
                num_experts=self.num_experts,
                experts_per_token=self.experts_per_token,
                gated_mlp=True,
                norm_topk_prob=True,
            )
        return config

    def recipe(self) -> dict[str, Any]:
        """The training hyperparameters, as recorded next to the weights."""
        shape = {"name", "summary", "n_layers", "d_model", "n_heads", "d_mlp", "act_fn",
                 "normalization_type", "positional_embedding_type", "num_experts", "experts_per_token"}
        return {k: v for k, v in asdict(self).items() if k not in shape}


ZOO: dict[str, ZooSpec] = {
    spec.name: spec
    for spec in (
        ZooSpec(
            name="tiny-relu",
            summary="dense GPT, ReLU MLPs (lazy neurons), LayerNorm, learned positions",
            n_layers=4,
            d_model=192,
            n_heads=6,
            d_mlp=768,
            act_fn="relu",
            normalization_type="LN",
            positional_embedding_type="standard",
            steps=5000,
            batch_size=128,
        ),
        ZooSpec(
            name="tiny-moe",
            summary="Mixtral-style MoE: 8 gated-SiLU experts, top-2, RMSNorm, rotary",
            n_layers=4,
            d_model=128,
            n_heads=4,
            d_mlp=192,
            act_fn="silu",
            normalization_type="RMS",
            positional_embedding_type="rotary",
            num_experts=8,
            experts_per_token=2,
            steps=2500,
            batch_size=256,
            lr=3e-3,
        ),
    )
}


def zoo_spec(name: str) -> ZooSpec:
    """The spec of a zoo model; unknown names raise with the list of known ones."""
    if name not in ZOO:
        raise WorkbenchError(f"unknown zoo model '{name}'; the zoo has: {', '.join(sorted(ZOO))}")
    return ZOO[name]


def zoo_dir(name: str) -> Path:
    """Where a zoo model's shipped files live."""
    return ZOO_DATA / name


def is_shipped(name: str, folder: Path | None = None) -> bool:
    """Whether weights, config and tokenizer are all present."""
    folder = folder or zoo_dir(name)
    return all((folder / f).is_file() for f in (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE))


def training_record(name: str, folder: Path | None = None) -> dict[str, Any] | None:
    """The shipped training.json of a zoo model, or None when it has none."""
    path = (folder or zoo_dir(name)) / RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def load_zoo_tokenizer(path: Path) -> Any:
    """The HF fast tokenizer over a zoo tokenizer.json; it prepends <|bos|> when asked for special tokens."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(path),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        add_bos_token=True,
        name_or_path=str(path.parent),
    )


def weights_fingerprint(path: Path) -> str:
    """Short sha256 of a weights file: what a store records to never mix two models."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def load_zoo_model(name: str, device: str = "cpu", folder: Path | None = None) -> ModelHandle:
    """Load a zoo model's shipped weights (fp16 on disk, float32 in memory) into a ModelHandle.

    folder: read from there instead of zoo_dir(name) (a `workbench zoo train --out` folder).
    """
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    zoo_spec(name)
    folder = Path(folder) if folder is not None else zoo_dir(name)
    if not is_shipped(name, folder):
        raise WorkbenchError(
            f"zoo model '{name}' has no weights in {folder}; run `workbench zoo train {name}` to make them"
        )
    config = json.loads((folder / CONFIG_FILE).read_text())
    config.pop("seed", None)  # a config seed would reseed the caller's global RNGs at load time
    tokenizer = load_zoo_tokenizer(folder / TOKENIZER_FILE)
    cfg = HookedTransformerConfig(**config, init_weights=False, device=device)
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    weights = {k: v.float() for k, v in load_file(str(folder / WEIGHTS_FILE)).items()}
    missing = set(dict(model.named_parameters())) - weights.keys()
    unexpected = weights.keys() - set(model.state_dict())
    if missing or unexpected:
        raise WorkbenchError(
            f"zoo weights in {folder} do not fit {name}'s config (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); run `workbench zoo train {name}` again"
        )
    model.load_state_dict(weights, strict=False)
    model.eval()
    return ModelHandle(
        name=name,
        model=model,
        tokenizer=tokenizer,
        fingerprint=weights_fingerprint(folder / WEIGHTS_FILE),
        kind="decoder",
        prefix_ids=[tokenizer.bos_token_id],
        suffix_ids=[],
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        extra={"zoo": name, "folder": str(folder), "probe_token_id": tokenizer.bos_token_id},
    )
