"""Load a local Hugging Face checkpoint folder as a hookable ModelHandle, with no hub access.

The folder is booted with TransformerLens's TransformerBridge (`boot_transformers(path)`),
which wraps the unchanged Hugging Face model and exposes TransformerLens hook names on it:
blocks.{l}.hook_resid_pre/post, blocks.{l}.attn.hook_pattern [batch, head, q, k],
blocks.{l}.mlp.hook_post. The bridge was chosen over a home-made adapter because it
supports every family asked for here offline (GPT-2, Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE,
BERT among ~150 architectures) and reproduces the Hugging Face forward exactly (tests
compare hidden states). Two things to know:
- on MoE blocks, `blocks.{l}.mlp.hook_post` (like hook_out) is the whole MoE block's output
  [.., d_model], not an expert's hidden layer: experts are one fused module in transformers 5.
  `handle.extra["moe"]` (see moe_layout.py) says how to recompute per-expert outputs;
- the bridge calls a hook under its canonical name (blocks.0.hook_out for
  blocks.0.hook_resid_post), so ModelHandle.run keys its cache by the name asked for.
The handle keeps its own tokenizer loaded from the folder, untouched (the bridge edits the
special tokens of the copy it holds).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.models.fingerprint import fingerprint_files
from workbench.models.handle import ModelHandle
from workbench.models.hub_access import hub_offline
from workbench.models.moe_layout import describe_moe_layers

# Bidirectional families the bridge supports; every other model is treated as a causal decoder.
ENCODER_MODEL_TYPES = frozenset({"bert"})
WEIGHT_SUFFIXES = (".safetensors", ".bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json")


def load_hf_folder(path: str | Path, device: str = "cpu", name: str | None = None) -> ModelHandle:
    """Load the checkpoint in `path` (config.json, weights, tokenizer files) as a ModelHandle.

    name: what the handle is called (defaults to the folder path). A malformed folder or an
    architecture the bridge does not know raises a WorkbenchError with one line.
    """
    folder = Path(path).expanduser().resolve()
    config = _read_config(folder)
    weights = _weight_files(folder)
    tokenizer = _load_tokenizer(folder)
    bridge = _boot_bridge(folder, device, config)
    kind = "encoder" if config.get("model_type") in ENCODER_MODEL_TYPES else "decoder"
    prefix_ids, suffix_ids = special_frame(tokenizer, kind)
    extra: dict[str, Any] = {
        "folder": str(folder),
        "architecture": bridge.cfg.architecture,
        "model_type": config.get("model_type"),
        "probe_token_id": prefix_ids[0] if prefix_ids else 0,
    }
    moe = describe_moe_layers(bridge)
    if moe:
        extra["moe"] = moe
    return ModelHandle(
        name=name or str(folder),
        model=bridge,
        tokenizer=tokenizer,
        fingerprint=fingerprint_files(weights),
        kind=kind,
        prefix_ids=prefix_ids,
        suffix_ids=suffix_ids,
        n_layers=int(bridge.cfg.n_layers),
        d_model=int(bridge.cfg.d_model),
        extra=extra,
    )


def special_frame(tokenizer: Any, kind: str) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts around a text: ([CLS], [SEP]) for BERT, ([BOS], []) for decoders.

    Read off the tokenizer itself (special tokens on minus off). A decoder whose tokenizer
    adds nothing still gets its BOS token in front when it has one, as TransformerLens does
    (GPT-2); decoders never get a suffix, so windows are not cut by an end-of-text token.
    """
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    framed = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    start = next((i for i in range(len(framed) - len(plain) + 1) if framed[i : i + len(plain)] == plain), 0)
    prefix, suffix = framed[:start], framed[start + len(plain) :]
    if kind == "encoder":
        return prefix, suffix
    if not prefix and tokenizer.bos_token_id is not None:
        prefix = [int(tokenizer.bos_token_id)]
    return prefix, []


def _read_config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise WorkbenchError(f"model folder {folder} does not exist")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise WorkbenchError(f"{folder} has no config.json: not a Hugging Face checkpoint folder")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WorkbenchError(f"{config_file} is not valid JSON ({exc}); re-save the checkpoint") from exc
    if not isinstance(config, dict) or "model_type" not in config:
        raise WorkbenchError(f"{config_file} has no model_type: not a transformers config")
    return config


def _weight_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)]
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    if not files:
        raise WorkbenchError(f"{folder} holds no weights (*.safetensors or *.bin); copy the whole checkpoint folder")
    return safetensors or files  # transformers reads the safetensors files when both kinds are there


def _load_tokenizer(folder: Path) -> Any:
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise WorkbenchError(
            f"{folder} has no tokenizer ({', '.join(TOKENIZER_FILES)}); save the tokenizer into the folder too"
        )
    from transformers import AutoTokenizer

    try:
        with hub_offline():
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises many types for a bad tokenizer folder
        raise WorkbenchError(f"cannot load the tokenizer in {folder}: {_first_line(exc)}") from exc


def _boot_bridge(folder: Path, device: str, config: dict[str, Any]) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    architecture = (config.get("architectures") or [config["model_type"]])[0]
    try:
        with hub_offline():
            bridge = TransformerBridge.boot_transformers(str(folder), device=device)
    except ValueError as exc:
        if "supported architecture" in str(exc):
            raise WorkbenchError(
                f"architecture {architecture} in {folder} is not supported by TransformerLens's bridge "
                "(supported include GPT2, Llama, Mistral, Mixtral, OLMoE, Qwen2/3, Qwen2/3-MoE, Gemma, BERT)"
            ) from exc
        raise WorkbenchError(f"cannot load {architecture} from {folder}: {_first_line(exc)}") from exc
    except Exception as exc:  # torch, safetensors and transformers each raise their own types
        raise WorkbenchError(f"cannot load {architecture} from {folder}: {_first_line(exc)}") from exc
    return bridge.eval()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."
