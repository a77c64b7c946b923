"""Evaluating an SAE on a store: reconstruction metrics over stored activations and the
CE loss with the reconstruction spliced into the model's forward pass, on the SAE's held-out
tokens (workbench.held_out) by default.

Loss recovered (as SAEBench reports it) = (CE_ablated - CE_sae) / (CE_ablated - CE_clean) with
the hook's activation replaced by its mean over the scored tokens: 1 means the SAE loses
nothing downstream, 0 means it is no better than always answering the mean. The same score
against zero ablation (deleting the activation) is reported beside it; it flatters an SAE,
as even a constant mean output recovers much of the loss that zeroing destroys. The model is
loaded with workbench.models.registry.load_model(store.model_name) and the SAE is applied
through a TransformerLens hook at the SAE's hook point. A transcoder (hook -> target hook,
e.g. an MLP's input to its output) is scored on its target: the FVU of its prediction of
the stored target, and the CE loss with the target hook's output replaced by the
transcoder's prediction from the input hook (the MLP replaced), zero ablation zeroing it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sae.errors import SAEError
from sae.evaluate import reconstruction_metrics
from sae.io import load_sae
from sae.model import SparseAutoencoder
from workbench.errors import WorkbenchError
from workbench.held_out import run_record, scored_tokens


def _open_store(store: Any) -> Any:
    if isinstance(store, (str, Path)):
        from workbench import Store

        return Store.open(store)
    return store


def check_finite_activations(x: torch.Tensor, store: Any, hook: str, first_token: int) -> None:
    """Refuse a chunk of stored activations holding NaN or Inf (token first_token is row 0):
    metrics and feature tables over them would be NaN, as training on them would."""
    bad = ~torch.isfinite(x).all(dim=1)
    if bool(bad.any()):
        at = first_token + int(bad.nonzero()[0, 0])
        raise WorkbenchError(
            f"store {store.root} holds non-finite values (NaN or Inf) in {hook} (first at token_index {at}); "
            "nothing was written: recapture the store without them"
        )


def finite_activations(store: Any, hook: str, chunk_tokens: int, start: int = 0, stop: int | None = None) -> Iterator[torch.Tensor]:
    """store.iter_activations(hook, ...) with every chunk checked by check_finite_activations."""
    offset = start
    for x in store.iter_activations(hook, chunk_tokens=chunk_tokens, start=start, stop=stop):
        check_finite_activations(x, store, hook, offset)
        offset += len(x)
        yield x


class ActivationMean:
    """The mean of the activation chunks that pass through tap() (summed in float64): the
    mean-ablation baseline, taken in the same pass as the reconstruction metrics."""

    def __init__(self, d_in: int) -> None:
        self.total = torch.zeros(d_in, dtype=torch.float64)
        self.count = 0

    def tap(self, chunks: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        for x in chunks:
            self.total += x.sum(dim=0, dtype=torch.float64).cpu()
            self.count += len(x)
            yield x

    def value(self) -> torch.Tensor:
        return (self.total / max(self.count, 1)).float()


def store_reconstruction_metrics(
    sae: SparseAutoencoder, store: Any, hook: str, tokens: int | None = None, chunk_tokens: int = 8192,
    device: str = "cpu", start: int = 0, stop: int | None = None, mean: ActivationMean | None = None,
    target_hook: str | None = None,
) -> dict[str, Any]:
    """sae.evaluate.reconstruction_metrics over stored activations of `hook` from token_index
    `start` to `stop` (the end if None), the first `tokens` of them if given, streamed; NaN or
    Inf in them is refused. target_hook: a transcoder's target, read over the same tokens.
    mean: accumulates the mean of what the model's ablation replaces (the target if any, else
    the hook) on the way."""
    if tokens is not None:
        stop = start + tokens if stop is None else min(stop, start + tokens)
    chunks: Iterator[Any] = finite_activations(store, hook, chunk_tokens, start, stop)
    if target_hook is not None:
        targets = finite_activations(store, target_hook, chunk_tokens, start, stop)
        chunks = zip(chunks, targets if mean is None else mean.tap(targets), strict=True)
    elif mean is not None:
        chunks = mean.tap(chunks)
    try:
        return reconstruction_metrics(sae, chunks, device)
    except SAEError:
        raise WorkbenchError(f"store {store.root} has no activations for {hook} in token_index [{start}, {stop})") from None


def token_windows(store: Any, max_sequences: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """The first max_sequences complete context windows of the store lying wholly in
    token_index [start, stop), [n, ctx] token ids (n may be 0)."""
    ctx = store.info().get("ctx")
    frame = store.df(
        "SELECT seq, pos, token_id FROM tokens WHERE seq IN "
        "(SELECT seq FROM tokens WHERE token_index >= ? AND token_index < ? GROUP BY seq HAVING count(*) = ? "
        "ORDER BY seq LIMIT ?) ORDER BY seq, pos",
        [start, 2**62 if stop is None else stop, ctx, max_sequences],
    )
    return torch.tensor(frame["token_id"].to_numpy(), dtype=torch.long).view(-1, ctx)


def loss_recovered(ce_ablated: float, ce_sae: float, ce_clean: float) -> float:
    """(CE_ablated - CE_sae) / (CE_ablated - CE_clean); NaN where the ablation costs nothing."""
    gap = ce_ablated - ce_clean
    return (ce_ablated - ce_sae) / gap if abs(gap) > 1e-12 else float("nan")


@torch.no_grad()
def ce_loss_score(handle: Any, sae: SparseAutoencoder, hook: str, windows: torch.Tensor, mean: torch.Tensor,
                  batch_size: int = 8, target_hook: str | None = None) -> dict[str, float]:
    """Mean next-token CE clean, with the SAE's reconstruction at `hook`, with the hook's
    activation replaced by `mean` and with it zeroed; and the loss recovered against each
    ablation. target_hook (a transcoder's): the target hook's activations are replaced by the
    prediction from `hook`'s, and by `mean` or zeros for the ablations."""
    model = handle.model
    device = handle.device
    sae = sae.to(device).eval()
    mean = mean.to(device)
    inputs: list[torch.Tensor] = []

    def splice(act: torch.Tensor, hook: Any) -> torch.Tensor:
        flat = (inputs.pop() if target_hook is not None else act).reshape(-1, sae.d_in).float()
        return sae.reconstruct(flat).reshape(act.shape).to(act.dtype)

    def mean_ablate(act: torch.Tensor, hook: Any) -> torch.Tensor:
        return mean.to(act.dtype).expand(act.numel() // mean.numel(), mean.numel()).reshape(act.shape)

    def keep_input(act: torch.Tensor, hook: Any) -> None:
        inputs.append(act)

    def zero(act: torch.Tensor, hook: Any) -> torch.Tensor:
        return torch.zeros_like(act)

    out = target_hook if target_hook is not None else hook
    spliced = [(out, splice)] if target_hook is None else [(hook, keep_input), (out, splice)]
    totals = {"ce_clean": 0.0, "ce_sae": 0.0, "ce_mean": 0.0, "ce_zero": 0.0}
    for first in range(0, len(windows), batch_size):
        batch = windows[first : first + batch_size].to(device)
        weight = len(batch) / len(windows)
        totals["ce_clean"] += weight * float(model(batch, return_type="loss"))
        totals["ce_sae"] += weight * float(model.run_with_hooks(batch, return_type="loss", fwd_hooks=spliced))
        for key, replace in (("ce_mean", mean_ablate), ("ce_zero", zero)):
            totals[key] += weight * float(model.run_with_hooks(batch, return_type="loss", fwd_hooks=[(out, replace)]))
    totals["loss_recovered"] = loss_recovered(totals["ce_mean"], totals["ce_sae"], totals["ce_clean"])
    totals["loss_recovered_zero"] = loss_recovered(totals["ce_zero"], totals["ce_sae"], totals["ce_clean"])
    totals["ce_sequences"] = len(windows)
    return totals


def evaluate_sae(
    sae: str | Path | SparseAutoencoder,
    store: Any,
    hook: str | None = None,
    tokens: int | None = None,
    ce_sequences: int = 32,
    device: str = "cpu",
    handle: Any = None,
    split: str = "held-out",
    record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """All metrics for an SAE folder (ours or any SAELens folder) or model on a store.

    hook defaults to the folder's metadata.hook_name. split "held-out" scores the tokens its
    run held out (workbench.held_out.scored_tokens: the folder's training.json, or `record` for
    a model; all stored tokens with a note where there is no usable split), "all" every stored
    token; tokens: only the first N of those. ce_sequences=0 skips the CE score, which runs
    the store's model (handle, or load_model(store.model_name); causal LMs only) on the first
    ce_sequences complete windows of the scored tokens.
    """
    store = _open_store(store)
    cfg: dict[str, Any] = {}
    if isinstance(sae, (str, Path)):
        record = run_record(Path(sae)) if split != "all" else None  # --split all needs no record
        sae, cfg = load_sae(sae, device)
    hook = hook or (cfg.get("metadata") or {}).get("hook_name")
    if not hook:
        raise WorkbenchError("the SAE folder names no hook (metadata.hook_name); pass --hook")
    hooks = store.info()["hooks"]
    target_hook = (cfg.get("metadata") or {}).get("hook_name_out") if sae.transcoder else None
    if sae.transcoder and not target_hook:
        raise WorkbenchError("the transcoder folder names no target hook (metadata.hook_name_out)")
    for name, d, what in ((hook, sae.d_in, "d_in"), *(((target_hook, sae.d_out, "d_out"),) if target_hook else ())):
        if name not in hooks:
            raise WorkbenchError(f"hook '{name}' is not in store {store.root} (stored: {', '.join(sorted(hooks)) or 'none'})")
        width = int(torch.tensor(hooks[name]["shape"]).prod())
        if width != d:
            raise WorkbenchError(f"SAE {what}={d} does not match {name} width {width} in store {store.root}")
    scored = scored_tokens(store, record, split)
    result: dict[str, Any] = {"hook": hook, "store": str(store.root), "d_sae": sae.d_sae, **scored.describe()}
    if target_hook:
        result["target_hook"] = target_hook
    mean = ActivationMean(sae.d_out)
    result.update(store_reconstruction_metrics(sae, store, hook, tokens, device=device, start=scored.start, stop=scored.stop,
                                               mean=mean, target_hook=target_hook))
    if ce_sequences > 0:
        if handle is None:
            from workbench.models.registry import load_model

            handle = load_model(store.model_name, device=device)
        windows = token_windows(store, ce_sequences, scored.start, scored.start + result["tokens"])
        if handle.kind != "decoder":
            result["ce_skipped"] = f"{store.model_name} is an encoder; the CE-loss score needs a causal LM"
        elif not len(windows):
            result["ce_skipped"] = f"no complete context window lies in the scored tokens [{scored.start}, {scored.stop})"
        else:
            result.update(ce_loss_score(handle, sae, hook, windows, mean.value(), target_hook=target_hook))
    return result
