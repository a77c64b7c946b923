"""Load a TransformerLens model name (gpt2, pythia-70m, ...) through HookedTransformer.from_pretrained.

The weights come from the Hugging Face hub, or from its local cache when the hub cannot
be reached. The hub is never asked blindly: with HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set,
or when its host does not answer a TCP connection within 3 s, loading runs in offline mode
(local cache only), so a machine without network gets one WorkbenchError line naming the
models that work offline instead of the hub client's retries and a traceback.
"""

from __future__ import annotations

import difflib
from typing import Any

from workbench.errors import WorkbenchError
from workbench.models.fingerprint import fingerprint_state_dict
from workbench.models.handle import ModelHandle
from workbench.models.hub_access import hub_endpoint, hub_offline, hub_reachable, offline_requested

HUB_TIMEOUT_S = 3.0


def official_name(name: str, offline_choices: list[str] | None = None) -> str:
    """TransformerLens's official name for `name` (aliases accepted); unknown names raise with close matches."""
    from transformer_lens.loading_from_pretrained import get_official_model_name
    from transformer_lens.supported_models import MODEL_ALIASES, OFFICIAL_MODEL_NAMES

    try:
        return get_official_model_name(name)
    except ValueError:
        known = list(OFFICIAL_MODEL_NAMES) + [alias for aliases in MODEL_ALIASES.values() for alias in aliases]
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = f" (closest TransformerLens names: {', '.join(close)})" if close else ""
        raise WorkbenchError(
            f"unknown model '{name}': not a local folder or a TransformerLens name{hint}; "
            f"{_offline_hint(offline_choices)}"
        ) from None


def load_tl_name(name: str, device: str = "cpu", offline_choices: list[str] | None = None) -> ModelHandle:
    """HookedTransformer.from_pretrained(name) as a decoder ModelHandle, from the hub or the local cache.

    offline_choices: model names that load with no network, listed in the error when the
    hub is out of reach and the cache lacks the model.
    """
    official = official_name(name, offline_choices)
    offline = offline_requested() or not hub_reachable(HUB_TIMEOUT_S)
    try:
        if offline:
            with hub_offline():
                model = _from_pretrained(official, device)
        else:
            model = _from_pretrained(official, device)
    except Exception as exc:  # the hub client, transformers and TransformerLens each raise their own types
        if offline:
            why = "HF_HUB_OFFLINE is set" if offline_requested() else f"{hub_endpoint()} cannot be reached"
            raise WorkbenchError(
                f"TransformerLens model '{official}' is not in the local Hugging Face cache and {why}; "
                f"{_offline_hint(offline_choices)}"
            ) from exc
        raise WorkbenchError(f"cannot load TransformerLens model '{official}': {_first_line(exc)}") from exc
    tokenizer = model.tokenizer
    prefix = [int(tokenizer.bos_token_id)] if model.cfg.default_prepend_bos and tokenizer.bos_token_id is not None else []
    return ModelHandle(
        name=name,
        model=model,
        tokenizer=tokenizer,
        fingerprint=fingerprint_state_dict(model.state_dict()),
        kind="decoder",
        prefix_ids=prefix,
        suffix_ids=[],
        n_layers=int(model.cfg.n_layers),
        d_model=int(model.cfg.d_model),
        extra={"transformer_lens_name": official, "probe_token_id": prefix[0] if prefix else 0},
    )


def _from_pretrained(official: str, device: str) -> Any:
    from transformer_lens import HookedTransformer

    return HookedTransformer.from_pretrained(official, device=device).eval()


def _offline_hint(offline_choices: list[str] | None) -> str:
    names = "".join(f"{choice}, " for choice in offline_choices or [])
    return f"models that work offline: {names}or a local Hugging Face folder"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    line = lines[0] if lines else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."
