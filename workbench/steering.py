"""Feature steering: generate from a decoder model with one SAE feature added or clamped at the
SAE's hook, beside the same generation left alone.

"add" puts strength * W_dec[f] onto the hook's output at every position (as if the feature
fired `strength` more there); "clamp" sets the feature's activation to `strength` everywhere
by adding (strength - a_f(x)) * W_dec[f], which keeps the SAE's reconstruction error and the
other features as they were. Generation is greedy (argmax), so the same call gives the same
continuations. The logits that move most are read at the first generated position: steered
minus clean next-token logits after the prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from sae.model import SparseAutoencoder
from workbench.errors import WorkbenchError
from workbench.models.handle import ModelHandle
from workbench.releases import load_sae

MODES = ("add", "clamp")


@dataclass
class SteeringResult:
    """Both greedy continuations of a prompt (token strings) and the next-token logits that the
    steering moved most (token, token_id, clean, steered, change): the top rises, then the top falls, sorted by change."""

    prompt: str
    feature: int
    mode: str
    strength: float
    clean: list[str]
    steered: list[str]
    moved: pd.DataFrame

    @property
    def clean_text(self) -> str:
        return "".join(self.clean)

    @property
    def steered_text(self) -> str:
        return "".join(self.steered)


def steering_hook(sae: SparseAutoencoder, feature: int, mode: str, strength: float) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """A TransformerLens forward hook that adds or clamps `feature` in the hook's output."""
    if mode not in MODES:
        raise WorkbenchError(f"steering mode '{mode}' is not one of {', '.join(MODES)}")
    if not 0 <= feature < sae.d_sae:
        raise WorkbenchError(f"feature {feature} is out of range: the SAE has features 0..{sae.d_sae - 1}")
    direction = sae.W_dec[feature].detach()

    def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
        flat = tensor.reshape(*tensor.shape[:2], -1)
        if flat.shape[-1] != sae.d_in:
            raise WorkbenchError(f"hook {hook.name} gives vectors of {flat.shape[-1]}, the SAE takes d_in={sae.d_in}")
        d = direction.to(flat.device, flat.dtype)
        if mode == "add":
            scale = torch.full(flat.shape[:2], float(strength), device=flat.device, dtype=flat.dtype)
        else:
            acts = sae.feature_acts(flat.reshape(-1, sae.d_in).float())[:, feature].reshape(flat.shape[:2])
            scale = float(strength) - acts.to(flat.dtype)
        return (flat + scale[..., None] * d).reshape(tensor.shape)

    return hook


@torch.inference_mode()
def _greedy(handle: ModelHandle, ids: list[int], steps: int, hooks: list[tuple[str, Any]]) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation of ids under hooks, and the first step's next-token logits."""
    tokens = torch.tensor([ids], device=handle.device)
    first = None
    for _ in range(steps):
        logits = handle.model.run_with_hooks(tokens, fwd_hooks=hooks, return_type="logits")[0, -1].float()
        first = logits if first is None else first
        tokens = torch.cat([tokens, logits.argmax().view(1, 1)], dim=1)
    return tokens[0, len(ids):].tolist(), first


def steer_loaded(
    handle: ModelHandle, sae: SparseAutoencoder, hook: str, feature: int, mode: str, strength: float, prompt: str,
    max_new_tokens: int = 20, top: int = 10,
) -> SteeringResult:
    """steer() on a loaded model and SAE (what the app calls with its cached ones)."""
    if handle.kind != "decoder":
        raise WorkbenchError(f"model {handle.name} is an {handle.kind}: steering needs a decoder that generates")
    if max_new_tokens < 1:
        raise WorkbenchError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    handle.resolve_hooks([hook])
    room = (handle.n_ctx or 10**9) - max_new_tokens
    ids = handle.window_ids(prompt, limit=room)
    if room < 1 or not ids:
        raise WorkbenchError(f"the prompt is empty or max_new_tokens={max_new_tokens} leaves no room in the context of {handle.n_ctx}")
    steer_fn = steering_hook(sae, feature, mode, strength)
    clean, clean_logits = _greedy(handle, ids, max_new_tokens, [])
    steered, steered_logits = _greedy(handle, ids, max_new_tokens, [(hook, steer_fn)])
    change = steered_logits - clean_logits
    order = torch.argsort(change, descending=True).tolist()
    picks = order[:top] + order[-top:]  # largest rise first, largest fall last
    moved = pd.DataFrame({
        "token": handle.token_strings(picks),
        "token_id": picks,
        "clean": clean_logits[picks].tolist(),
        "steered": steered_logits[picks].tolist(),
        "change": change[picks].tolist(),
    })
    return SteeringResult(prompt, feature, mode, float(strength), handle.token_strings(clean), handle.token_strings(steered), moved)


def steer(
    model_name: str, sae_dir: str | Path, feature: int, mode: str = "add", strength: float = 10.0, prompt: str = "",
    max_new_tokens: int = 20, hook: str | None = None, device: str = "cpu",
) -> SteeringResult:
    """Greedy continuations of prompt from model_name (any spec load_model takes) without and with
    feature of the SAE in sae_dir (a folder or "release/id", workbench.releases) added ("add") or
    clamped ("clamp") at strength, at the SAE's hook (its cfg metadata.hook_name unless hook is given)."""
    from workbench.models.registry import load_model

    sae, cfg = load_sae(sae_dir, device=device)
    hook = hook or (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name")
    if not hook:
        raise WorkbenchError(f"{sae_dir}/cfg.json names no hook (metadata.hook_name); pass hook=")
    return steer_loaded(load_model(model_name, device=device), sae, hook, feature, mode, strength, prompt, max_new_tokens)
