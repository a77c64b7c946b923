"""A whole SAE's feature dashboards as Neuronpedia's upload JSON, from the feature pass's tables.

The format is the one SAEDashboard's neuronpedia runner writes (NeuronpediaDashboardBatch /
NeuronpediaDashboardFeature / NeuronpediaDashboardActivation): files batch-<n>.json, each
{model_id, layer, sae_set, features: [...]}, a feature carrying

  feature_index, frac_nonzero, activations [{bin_min, bin_max, bin_contains, tokens, values}]
  (the top examples in a bin with bin_min = bin_contains = -1 and bin_max the largest
  activation, then quantile bins, highest first, bin_contains the share of activations
  inside), pos_str / pos_values and neg_str / neg_values (top and bottom logits of
  W_dec[f] @ W_U), freq_hist_data_bar_values / _heights (histogram of the non-zero
  activations), logits_hist_data_bar_values / _heights (of W_dec[f] @ W_U over the vocabulary),
  correlated_features_indices / _pearson / _l1 (Pearson r from the pass; decoder cosine in
  _l1, as SAEDashboard puts its cosine there), neuron_alignment_indices / _values / _l1 (the
  decoder row's largest entries), n_prompts_total, n_tokens_in_prompt, dataset;
  correlated_neurons_* and decoder_weights_dist empty (the tables do not hold them).

Examples, counts and correlations come from the tables (FeatureTables.page per feature, one
pruned read each); only the logits are computed, once for all features in blocks.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae.io import load_sae
from sae.model import SparseAutoencoder
from workbench.analysis.feature_page import FeaturePage, FeatureTables, TokenText
from workbench.analysis.features import sae_name
from workbench.errors import WorkbenchError
from workbench.releases import resolve_release
from workbench.store.reader import Store

N_LOGITS = 10
HISTOGRAM_BINS = 40
NEURON_ALIGNMENT = 3
LOGIT_BLOCK = 256  # features whose logit effects are computed at once


@dataclass
class NeuronpediaExport:
    """What `workbench export-neuronpedia` wrote."""

    out: Path
    files: list[Path]
    features: int
    model_id: str
    sae_set: str
    layer: int
    logits: bool
    folder: Path
    name: str
    l0: float
    fvu: float


def hook_layer(hook: str) -> int:
    """The block number of a TransformerLens hook name (0 for hooks outside the blocks)."""
    found = re.match(r"blocks\.(\d+)\.", hook)
    return int(found.group(1)) if found else 0


def _histogram(values: np.ndarray) -> tuple[list[float], list[int]]:
    """(bar centres, bar heights) of values, SAEDashboard's histogram shape."""
    if not len(values):
        return [], []
    heights, edges = np.histogram(np.asarray(values, np.float64), bins=HISTOGRAM_BINS)
    return np.round((edges[:-1] + edges[1:]) / 2, 4).tolist(), heights.astype(int).tolist()


def _round(values: Any) -> list[float]:
    return [round(float(v), 4) for v in values]


def _activations(page: FeaturePage) -> list[dict[str, Any]]:
    rows = [{"bin_min": -1.0, "bin_max": float(page.max), "bin_contains": -1.0, "tokens": e.tokens, "values": _round(e.acts)}
            for e in page.top]  # fmt: skip
    for (lo, hi, share), (_, examples) in zip(page.interval_bins, page.intervals):
        rows += [{"bin_min": lo, "bin_max": hi, "bin_contains": share, "tokens": e.tokens, "values": _round(e.acts)} for e in examples]
    return rows


def feature_json(
    page: FeaturePage, sae: SparseAutoencoder, effect: torch.Tensor | None, token_strings: Any, store_info: dict[str, Any]
) -> dict[str, Any]:
    """One feature's NeuronpediaDashboardFeature dict; effect is W_dec[f] @ W_U (None without an unembedding)."""
    f = page.feature
    row = sae.W_dec[f].detach().float()
    align = torch.topk(row.abs(), min(NEURON_ALIGNMENT, len(row))).indices
    corr = page.correlated
    unit = torch.nn.functional.normalize(sae.W_dec.detach().float(), dim=1)
    others = torch.as_tensor(corr["other"].to_numpy(np.int64))
    pos_str: list[str] = []
    neg_str: list[str] = []
    pos_values: list[float] = []
    neg_values: list[float] = []
    logit_bars: tuple[list[float], list[int]] = ([], [])
    if effect is not None:
        top, bottom = torch.topk(effect, N_LOGITS), torch.topk(effect, N_LOGITS, largest=False)
        pos_str, pos_values = token_strings(top.indices.tolist()), _round(top.values)
        neg_str, neg_values = token_strings(bottom.indices.tolist()), _round(bottom.values)
        logit_bars = _histogram(effect.numpy())
    freq_values, freq_heights = _histogram(page.values)
    return {
        "feature_index": f,
        "neuron_alignment_indices": align.tolist(),
        "neuron_alignment_values": _round(row[align]),
        "neuron_alignment_l1": _round(row[align].abs() / row.abs().sum().clamp(min=1e-12)),
        "correlated_neurons_indices": [],
        "correlated_neurons_l1": [],
        "correlated_neurons_pearson": [],
        "correlated_features_indices": corr["other"].astype(int).tolist(),
        "correlated_features_l1": _round(unit[others] @ unit[f]) if len(others) else [],
        "correlated_features_pearson": _round(corr["corr"]),
        "neg_str": neg_str,
        "neg_values": neg_values,
        "pos_str": pos_str,
        "pos_values": pos_values,
        "frac_nonzero": float(page.density),
        "freq_hist_data_bar_values": freq_values,
        "freq_hist_data_bar_heights": freq_heights,
        "logits_hist_data_bar_heights": logit_bars[1],
        "logits_hist_data_bar_values": logit_bars[0],
        "n_prompts_total": int(store_info["sequences"]),
        "n_tokens_in_prompt": int(store_info["ctx"] or 0),
        "dataset": str(store_info["data"] or ""),
        "decoder_weights_dist": [],
        "activations": _activations(page),
    }


def export_neuronpedia(
    store: Store, sae_dir: str | Path, out: str | Path, name: str | None = None, model_id: str | None = None,
    sae_set: str | None = None, features_per_file: int = 128, n_bins: int = 10, per_bin: int = 5, n_top: int = 20,
) -> NeuronpediaExport:
    """Write every feature of the SAE passed over store as Neuronpedia batch files in out. The
    logits need the store's model (its unembedding at the SAE's width); without one they are
    left empty and the export says so (logits=False)."""
    from workbench.models.registry import load_model

    if features_per_file < 1:
        raise WorkbenchError(f"--features-per-file must be at least 1, got {features_per_file}")
    folder = Path(sae_dir) if Path(sae_dir).is_dir() else resolve_release(str(sae_dir))
    sae, _ = load_sae(folder)
    name = name or sae_name(folder)
    tables = FeatureTables(store, name)
    if tables.d_sae != sae.d_sae:
        raise WorkbenchError(f"the feature pass '{name}' in {store.root} has {tables.d_sae} features, the SAE {folder} {sae.d_sae}")
    hook = str(tables.info["hook"])
    try:
        handle = load_model(store.model_name)
    except (WorkbenchError, OSError, ValueError):
        handle = None
    W_U = getattr(getattr(handle, "model", None), "W_U", None)
    W_U = W_U.detach().float() if W_U is not None and W_U.shape[0] == sae.d_in else None
    text = TokenText(store)
    info = store.info()
    store_info = {"sequences": len(text.starts) - 1, "ctx": info["ctx"], "data": info["data"]}
    model_id = model_id or store.model_name
    sae_set = sae_set or f"{hook_layer(hook)}-{name}"
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WorkbenchError(f"cannot create the export folder {out} ({err.strerror or err})") from err
    files, strings = [], (handle.token_strings if handle is not None else None)
    for start in range(0, sae.d_sae, features_per_file):
        stop = min(start + features_per_file, sae.d_sae)
        effects = None
        if W_U is not None:
            with torch.no_grad():
                effects = torch.cat([sae.W_dec[lo : min(lo + LOGIT_BLOCK, stop)].float() @ W_U for lo in range(start, stop, LOGIT_BLOCK)])
        features = []
        for f in range(start, stop):
            page = tables.page(f, text, n_top=n_top, n_intervals=n_bins, per_interval=per_bin, left=24, right=8, bins="quantile")
            features.append(feature_json(page, sae, None if effects is None else effects[f - start], strings, store_info))
        batch = {"model_id": model_id, "layer": hook_layer(hook), "sae_set": sae_set, "features": features}
        path = out / f"batch-{start // features_per_file}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(json.dumps(batch))
            tmp.replace(path)
        except OSError as err:
            raise WorkbenchError(f"cannot write {path} ({err.strerror or err})") from err
        files.append(path)
    return NeuronpediaExport(out, files, sae.d_sae, model_id, sae_set, hook_layer(hook), W_U is not None, folder.resolve(),
                             name, float(tables.info["l0"]), float(tables.info["fvu"]))  # fmt: skip
