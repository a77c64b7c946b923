"""Reading and writing SAEs in the SAELens layout: cfg.json + sae_weights.safetensors.

Writing folds the training-time input scale into the weights (the saved SAE takes raw
activations) and saves each rule in its SAELens inference form: TopK as "topk", Mutual
Choice and GBA as "jumprelu" with their thresholds (GBA's is minus its adapted bias).
Reading takes any SAELens folder of a registered architecture (sae.registry: "topk",
"jumprelu", "standard"; ours or a peer's), so `workbench eval` and the browser work on both.

Transcoders are saved as SAELens saves them (sae_lens.saes.transcoder): W_dec [d_sae, d_out],
b_dec [d_out], cfg d_out, apply_b_dec_to_input false, metadata.hook_name_out beside hook_name,
and for a skip transcoder W_skip [d_out, d_in]. The architecture is the rule's with
"_transcoder" (or "_skip_transcoder") appended, a ReLU rule's being plain "transcoder":
SAELens loads "transcoder", "skip_transcoder", "jumprelu_transcoder" and
"jumprelu_skip_transcoder"; it has no TopK transcoder, so "topk_transcoder" and
"topk_skip_transcoder" folders load here only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sae.errors import SAEError
from sae.model import SparseAutoencoder
from sae.registry import architecture

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
#: The suffix of a transcoder's architecture; SAELens's ReLU rule ("standard") has none before it.
TRANSCODER = "transcoder"
SKIP_PREFIX = "skip_"


def transcoder_architecture(rule_architecture: str, skip: bool) -> str:
    """The SAELens architecture of a transcoder whose rule saves as rule_architecture."""
    base = "" if rule_architecture == "standard" else f"{rule_architecture}_"
    return f"{base}{SKIP_PREFIX if skip else ''}{TRANSCODER}"


def split_transcoder_architecture(name: str) -> tuple[str, bool] | None:
    """(the rule's architecture, skip) of a transcoder architecture name; None for an SAE's."""
    if not name.endswith(TRANSCODER):
        return None
    base = name[: -len(TRANSCODER)]
    skip = base.endswith(SKIP_PREFIX)
    base = base[: -len(SKIP_PREFIX)] if skip else base
    return (base.rstrip("_") or "standard"), skip


def _saelens_version() -> str:
    """The installed sae-lens version (read from package metadata: importing it takes seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sae-lens")
    except PackageNotFoundError:  # the format does not need the package; >= 6 keeps its loader on the v6 path
        return "6.0.0"


def _write_atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


@torch.no_grad()
def save_sae(folder: str | Path, model: SparseAutoencoder, input_scale: float = 1.0, metadata: dict[str, Any] | None = None,
             target_scale: float | None = None) -> Path:
    """Write model (trained on inputs multiplied by input_scale, and a transcoder on targets
    multiplied by target_scale; None: input_scale) as a SAELens folder.

    Folding: the model computes z = (s x - b_dec) W_enc + b_enc and x_hat = (f(z) W_dec + b_dec) / t
    in raw units (t = s for an autoencoder), which is a plain SAE with W_enc' = s W_enc,
    b_dec' = b_dec / t, W_dec' = W_dec / t (b_enc and thresholds unchanged); a skip
    transcoder's s x W_skip^T / t makes W_skip' = W_skip s / t.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    s = float(input_scale)
    t = s if target_scale is None else float(target_scale)
    tensors = {
        "W_enc": (model.encoder_matrix() * s).contiguous(),
        "b_enc": model.b_enc.detach().clone(),
        "W_dec": (model.W_dec / t).contiguous(),
        "b_dec": (model.b_dec / t).contiguous(),
    }
    if model.W_skip is not None:
        tensors["W_skip"] = (model.W_skip * (s / t)).contiguous()
    tensors.update(model.rule.saelens_tensors(model.d_sae))
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    meta = {"sae_lens_version": _saelens_version(), "sae_lens_training_version": None}
    meta.update(metadata or {})
    architecture_name = model.rule.saelens_architecture
    if model.transcoder:
        architecture_name = transcoder_architecture(architecture_name, model.W_skip is not None)
    cfg = {
        "architecture": architecture_name,
        "d_in": model.d_in,
        "d_sae": model.d_sae,
        **({"d_out": model.d_out} if model.transcoder else {}),
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": not model.transcoder,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **model.rule.saelens_config(),
        "metadata": meta,
    }
    _write_atomic(folder / WEIGHTS_FILE, lambda p: save_file(tensors, str(p)))
    _write_atomic(folder / CFG_FILE, lambda p: p.write_text(json.dumps(cfg, indent=2)))
    return folder


def read_cfg(folder: str | Path) -> dict[str, Any]:
    """cfg.json of a SAELens folder (raises an SAEError if it is not one)."""
    folder = Path(folder)
    path = folder / CFG_FILE
    if not path.is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise SAEError(f"{folder} is not an SAE folder (needs {CFG_FILE} and {WEIGHTS_FILE})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SAEError(f"{path} is not valid JSON ({err.msg})") from err


def _read_weights(folder: Path, cfg: dict[str, Any], own: tuple[str, ...], skip: bool) -> dict[str, torch.Tensor]:
    """The folder's tensors as float32, after checking they are whole and fit one SAE:
    W_enc [d_in, d_sae], W_dec [d_sae, d_out], b_dec [d_out], b_enc and the architecture's
    own tensors (a jumprelu threshold) [d_sae], W_skip [d_out, d_in] for a skip transcoder
    (d_out: cfg's for a transcoder, else d_in)."""
    path = folder / WEIGHTS_FILE
    try:
        weights = {k: v.float() for k, v in load_file(str(path)).items()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise SAEError(f"{path} is not a readable safetensors file ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from err
    missing = [k for k in ("W_enc", "W_dec", "b_dec", *own, *(("W_skip",) if skip else ())) if k not in weights]
    if missing:
        raise SAEError(f"{path} lacks {', '.join(missing)}: not a complete SAELens SAE")
    W_enc = weights["W_enc"]
    if W_enc.ndim != 2:
        raise SAEError(f"{path}: W_enc has shape {list(W_enc.shape)}, not [d_in, d_sae]")
    # the sizes cfg.json gives (else W_enc's) are what every tensor must fit
    d_in, d_sae = (cfg.get(key, n) for key, n in (("d_in", W_enc.shape[0]), ("d_sae", W_enc.shape[1])))
    d_out = cfg.get("d_out", d_in) if split_transcoder_architecture(cfg.get("architecture", "")) else d_in
    if not (isinstance(d_in, int) and isinstance(d_sae, int) and isinstance(d_out, int)):
        raise SAEError(f"{folder / CFG_FILE}: d_in, d_sae and d_out must be integers (got {d_in!r}, {d_sae!r}, {d_out!r})")
    expected = {"W_enc": [d_in, d_sae], "W_dec": [d_sae, d_out], "b_dec": [d_out], "b_enc": [d_sae], **{k: [d_sae] for k in own}}
    if skip:
        expected["W_skip"] = [d_out, d_in]
    for key, shape in expected.items():
        if key in weights and list(weights[key].shape) != shape:
            raise SAEError(
                f"{path}: {key} has shape {list(weights[key].shape)}, not {shape} (d_in={d_in}, d_sae={d_sae}): not one SAE"
            )
    return weights


@torch.no_grad()
def load_sae(folder: str | Path, device: str = "cpu") -> tuple[SparseAutoencoder, dict[str, Any]]:
    """(model in raw activation units, cfg) from a SAELens folder."""
    cfg = read_cfg(folder)
    if cfg.get("normalize_activations", "none") != "none":
        raise SAEError(
            f"{folder}: normalize_activations={cfg['normalize_activations']!r} is not supported; "
            "fold the normalisation into the weights first (SAELens: fold_activation_norm_scaling_factor)"
        )
    if cfg.get("reshape_activations", "none") != "none":
        raise SAEError(f"{folder}: reshape_activations={cfg['reshape_activations']!r} is not supported")
    transcoder = split_transcoder_architecture(cfg.get("architecture", ""))
    rule_cfg = cfg if transcoder is None else {**cfg, "architecture": transcoder[0]}
    skip = transcoder is not None and transcoder[1]
    own = architecture(rule_cfg)  # refuses an unknown architecture before the weights are read
    weights = _read_weights(Path(folder), cfg, own.tensors, skip)
    W_enc, b_dec = weights["W_enc"], weights["b_dec"]
    b_enc = weights.get("b_enc", torch.zeros(W_enc.shape[1]))
    if transcoder is None and not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + b_dec @ W_enc  # z = x W_enc + b_enc == (x - b_dec) W_enc + (b_enc + b_dec W_enc)
    weights["b_enc"] = b_enc
    rule = own.load(rule_cfg, weights)  # may fold an architecture's own scaling into the weights
    d_out = weights["W_dec"].shape[1] if transcoder is not None else None
    model = SparseAutoencoder(W_enc.shape[0], W_enc.shape[1], rule, d_out, skip)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", *(("W_skip",) if skip else ())):
        getattr(model, name).copy_(weights[name])
    return model.to(device).eval(), cfg
