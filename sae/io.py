"""Reading and writing SAEs in the SAELens layout: cfg.json + sae_weights.safetensors.

Writing folds the training-time input scale into the weights (the saved SAE takes raw
activations) and saves each rule in its SAELens inference form: TopK as "topk", Mutual
Choice and GBA as "jumprelu" with their thresholds (GBA's is minus its adapted bias).
Reading takes any SAELens folder of a registered architecture (sae.registry: "topk",
"jumprelu", "standard"; ours or a peer's), so `workbench eval` and the browser work on both.
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
def save_sae(folder: str | Path, model: SparseAutoencoder, input_scale: float = 1.0, metadata: dict[str, Any] | None = None) -> Path:
    """Write model (trained on inputs multiplied by input_scale) as a SAELens folder.

    Folding: the model computes z = (s x - b_dec) W_enc + b_enc and x_hat = (f(z) W_dec + b_dec) / s
    in raw units, which is a plain SAE with W_enc' = s W_enc, b_dec' = b_dec / s,
    W_dec' = W_dec / s (b_enc and thresholds unchanged).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    s = float(input_scale)
    tensors = {
        "W_enc": (model.encoder_matrix() * s).contiguous(),
        "b_enc": model.b_enc.detach().clone(),
        "W_dec": (model.W_dec / s).contiguous(),
        "b_dec": (model.b_dec / s).contiguous(),
    }
    tensors.update(model.rule.saelens_tensors(model.d_sae))
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    meta = {"sae_lens_version": _saelens_version(), "sae_lens_training_version": None}
    meta.update(metadata or {})
    cfg = {
        "architecture": model.rule.saelens_architecture,
        "d_in": model.d_in,
        "d_sae": model.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
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


def _read_weights(folder: Path, cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The folder's tensors as float32, after checking they are whole and fit one SAE:
    W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_dec [d_in], b_enc and the architecture's
    own tensors (a jumprelu threshold) [d_sae]."""
    path = folder / WEIGHTS_FILE
    try:
        weights = {k: v.float() for k, v in load_file(str(path)).items()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise SAEError(f"{path} is not a readable safetensors file ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from err
    own = architecture(cfg).tensors
    missing = [k for k in ("W_enc", "W_dec", "b_dec", *own) if k not in weights]
    if missing:
        raise SAEError(f"{path} lacks {', '.join(missing)}: not a complete SAELens SAE")
    W_enc = weights["W_enc"]
    if W_enc.ndim != 2:
        raise SAEError(f"{path}: W_enc has shape {list(W_enc.shape)}, not [d_in, d_sae]")
    # the sizes cfg.json gives (else W_enc's) are what every tensor must fit
    d_in, d_sae = (cfg.get(key, n) for key, n in (("d_in", W_enc.shape[0]), ("d_sae", W_enc.shape[1])))
    if not (isinstance(d_in, int) and isinstance(d_sae, int)):
        raise SAEError(f"{folder / CFG_FILE}: d_in and d_sae must be integers (got {d_in!r}, {d_sae!r})")
    expected = {"W_enc": [d_in, d_sae], "W_dec": [d_sae, d_in], "b_dec": [d_in], "b_enc": [d_sae], **{k: [d_sae] for k in own}}
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
    weights = _read_weights(Path(folder), cfg)
    W_enc, b_dec = weights["W_enc"], weights["b_dec"]
    b_enc = weights.get("b_enc", torch.zeros(W_enc.shape[1]))
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + b_dec @ W_enc  # z = x W_enc + b_enc == (x - b_dec) W_enc + (b_enc + b_dec W_enc)
    weights["b_enc"] = b_enc
    rule = architecture(cfg).load(cfg, weights)  # may fold an architecture's own scaling into the weights
    model = SparseAutoencoder(W_enc.shape[0], W_enc.shape[1], rule)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        getattr(model, name).copy_(weights[name])
    return model.to(device).eval(), cfg
