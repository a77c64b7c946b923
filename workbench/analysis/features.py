"""The feature pass: encode a store's activations with an SAE, keep only the non-zero
feature activations, and lay them out so that one feature's page is a few-millisecond read.

Tables written into the store (name = the SAE's name, letters, digits and underscores):

  features_<name>        (feature INT, value FLOAT, token_index BIGINT), sorted by feature
                         then value (largest first), in small row groups: a query for one
                         feature touches one or two row groups thanks to Parquet min/max stats.
  feature_stats_<name>   (feature, count, density, max, mean): mean over the tokens it fires on.
  feature_corr_<name>    (feature, other, corr): the most co-firing features, Pearson
                         correlation of activations over the first `corr_tokens` tokens.
  saes                   one row per SAE passed over this store: folder, hook, rule, FVU, L0,
                         dead fraction (no firing over the whole store), so SAEs trained on the
                         same hook are compared on the same tokens.

A pass publishes its three tables and the new saes table as one unit of the table group
FEATURES_GROUP (workbench/store/table_group.py): a reader sees every table of the previous
pass or every table of this one, even when the pass is killed half way. The rows are sorted
externally (feature_sort.py), so the pass's memory does not grow with the store.

The page's data (top examples with context, interval examples, histograms, correlated
features) is then computed from the feature's rows plus the store's token ids, which the
app holds in memory (TokenText), never by scanning all rows.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from sae.io import load_sae
from sae.model import SparseAutoencoder
from workbench.analysis.feature_sort import RUN_ROWS, RowSorter
from workbench.errors import WorkbenchError
from workbench.evaluation import finite_activations
from workbench.store.reader import Store
from workbench.store.table_group import TableUnit

SAES_TABLE = "saes"
#: The table group holding every SAE's feature tables and the saes table they share.
FEATURES_GROUP = "sae_features"
#: Rows per Parquet row group of a features table: small, so a feature's rows are a short read.
FEATURE_ROW_GROUP = 65536
#: Co-firing correlations need a d_sae x d_sae accumulator; above this width they are skipped.
MAX_CORR_WIDTH = 16384
PAIR_PRODUCTS_PER_STEP = 2**24  # co-firing products materialised at once (64 MB of float32)
CORRELATED_PER_FEATURE = 10


def sae_name(folder: str | Path) -> str:
    """Table-safe name of an SAE from its folder name (letters, digits, underscores)."""
    name = re.sub(r"[^0-9A-Za-z]+", "_", Path(folder).resolve().name).strip("_").lower()
    if not name:
        raise WorkbenchError(f"cannot name an SAE after folder {folder}; pass --name")
    return name


def features_table(name: str) -> str:
    return f"features_{name}"


def stats_table(name: str) -> str:
    return f"feature_stats_{name}"


def corr_table(name: str) -> str:
    return f"feature_corr_{name}"


def training_rule(folder: str | Path, cfg: dict[str, Any]) -> str:
    """The rule an SAE was trained with (topk / mutual-choice / gba), as the workbench trainer
    records it in cfg metadata or training.json; else the SAELens architecture (a Mutual
    Choice or GBA SAE is saved as jumprelu)."""
    recorded = ((cfg.get("metadata") or {}).get("workbench") or {}).get("arch")
    record_path = Path(folder) / "training.json"
    if not recorded and record_path.is_file():
        try:
            recorded = (json.loads(record_path.read_text()).get("config") or {}).get("arch")
        except json.JSONDecodeError:
            recorded = None
    return str(recorded or cfg.get("architecture", "unknown"))


@dataclass
class FeaturePassReport:
    """What `workbench features` prints and records in the saes table."""

    name: str
    folder: str
    hook: str
    rule: str
    d_in: int
    d_sae: int
    tokens: int
    rows: int
    l0: float
    fvu: float
    dead_fraction: float
    corr_tokens: int
    seconds: float


def _sae_hook(cfg: dict[str, Any], hook: str | None, folder: Path) -> str:
    found = (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name")
    if hook and found and hook != found:
        raise WorkbenchError(
            f"--hook {hook} is not the hook SAE {folder} was trained on ({found}); its features mean nothing there"
        )
    if hook:
        return hook
    if not found:
        raise WorkbenchError(f"{folder}/cfg.json names no hook (metadata.hook_name); pass --hook")
    return str(found)


def _check_fits(store: Store, cfg: dict[str, Any], hook: str, model: SparseAutoencoder, folder: Path) -> None:
    if hook not in store.hooks:
        stored = ", ".join(store.hooks) or "none"
        raise WorkbenchError(
            f"SAE {folder} reads hook '{hook}', which store {store.root} does not hold (stored: {stored}); "
            f"capture it with `workbench capture --hooks {hook} --store {store.root} ...`"
        )
    d = int(np.prod(store.hooks[hook]["shape"]))
    if d != model.d_in:
        raise WorkbenchError(f"SAE {folder} takes d_in={model.d_in} but hook '{hook}' stores vectors of {d}")
    sae_model = (cfg.get("metadata") or {}).get("model_name")
    if sae_model and sae_model != store.model_name:
        raise WorkbenchError(
            f"SAE {folder} was trained on model '{sae_model}' but store {store.root} holds '{store.model_name}'"
        )
    if store.n_tokens() == 0:
        raise WorkbenchError(f"store {store.root} holds no tokens yet; run `workbench capture` first")


def _target_hook(store: Store, cfg: dict[str, Any], model: SparseAutoencoder, folder: Path) -> str | None:
    """A transcoder's stored target hook (metadata.hook_name_out); None for an autoencoder."""
    if not model.transcoder:
        return None
    target = (cfg.get("metadata") or {}).get("hook_name_out")
    if not target:
        raise WorkbenchError(f"transcoder {folder}/cfg.json names no target hook (metadata.hook_name_out)")
    if target not in store.hooks:
        raise WorkbenchError(f"transcoder {folder} predicts hook '{target}', which store {store.root} does not hold; "
                             f"capture it with `workbench capture --hooks {target} --store {store.root} ...`")
    d = int(np.prod(store.hooks[target]["shape"]))
    if d != model.d_out:
        raise WorkbenchError(f"transcoder {folder} predicts d_out={model.d_out} but hook '{target}' stores vectors of {d}")
    return str(target)


class _Accumulator:
    """Running sums over the pass: reconstruction error, variance, per-feature counts and
    maxima, and (on the first corr_tokens tokens) the co-firing products."""

    def __init__(self, d_in: int, d_sae: int, corr_tokens: int) -> None:
        self.d_sae = d_sae
        self.tokens = 0
        self.sq_err = 0.0
        self.sum_x = torch.zeros(d_in, dtype=torch.float64)
        self.sum_sq = 0.0
        self.count = torch.zeros(d_sae, dtype=torch.long)
        self.total = torch.zeros(d_sae, dtype=torch.float64)
        self.max = torch.zeros(d_sae)
        self.corr_tokens = corr_tokens if d_sae <= MAX_CORR_WIDTH else 0
        self.corr_seen = 0
        self.cross = torch.zeros(d_sae * d_sae) if self.corr_tokens else None
        self.corr_sum = torch.zeros(d_sae, dtype=torch.float64)
        self.corr_sq = torch.zeros(d_sae, dtype=torch.float64)

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> None:
        self.tokens += len(x)
        self.sq_err += float((x - x_hat).double().pow(2).sum())
        self.sum_x += x.double().sum(0)
        self.sum_sq += float(x.double().pow(2).sum())
        active = values > 0
        feats, vals = indices[active], values[active]
        self.count.index_add_(0, feats, torch.ones_like(feats))
        self.total.index_add_(0, feats, vals.double())
        self.max.scatter_reduce_(0, feats, vals, reduce="amax")
        take = min(len(x), self.corr_tokens - self.corr_seen)
        if self.cross is not None and take > 0:
            idx, val = indices[:take], values[:take]
            width = max(int((val > 0).sum(1).max()), 1)
            if width < idx.shape[1]:  # dense-width codes (JumpReLU, ReLU): keep each row's active entries
                val, order = val.topk(width, dim=1)
                idx = idx.gather(1, order)
            step = max(1, PAIR_PRODUCTS_PER_STEP // (width * width))  # bounds the [rows, width, width] products
            for lo in range(0, take, step):
                i, v = idx[lo : lo + step], val[lo : lo + step]
                keys = (i[:, :, None] * self.d_sae + i[:, None, :]).reshape(-1)
                self.cross.index_add_(0, keys, (v[:, :, None] * v[:, None, :]).reshape(-1))
            self.corr_sum.index_add_(0, idx.reshape(-1), val.reshape(-1).double())
            self.corr_sq.index_add_(0, idx.reshape(-1), val.reshape(-1).double().pow(2))
            self.corr_seen += take

    def fvu(self) -> float:
        total_var = self.sum_sq - float(self.sum_x.pow(2).sum()) / max(self.tokens, 1)
        return self.sq_err / total_var if total_var > 0 else float("nan")

    def stats(self) -> pa.Table:
        count = self.count.numpy()
        mean = np.where(count > 0, self.total.numpy() / np.maximum(count, 1), 0.0)
        return pa.table({
            "feature": pa.array(np.arange(self.d_sae, dtype=np.int32)),
            "count": pa.array(count.astype(np.int64)),
            "density": pa.array(count / max(self.tokens, 1)),
            "max": pa.array(self.max.numpy().astype(np.float32)),
            "mean": pa.array(mean.astype(np.float32)),
        })

    def correlations(self) -> pa.Table:
        """Top co-firing partners of each feature: Pearson r over the sample, pairs that co-fired."""
        n = self.corr_seen
        empty = pa.table({"feature": pa.array([], pa.int32()), "other": pa.array([], pa.int32()), "corr": pa.array([], pa.float32())})
        if self.cross is None or n < 2:
            return empty
        cross = self.cross.view(self.d_sae, self.d_sae).double()
        mean = self.corr_sum / n
        std = (self.corr_sq / n - mean.pow(2)).clamp(min=0).sqrt()
        corr = (cross / n - mean[:, None] * mean[None, :]) / (std[:, None] * std[None, :]).clamp(min=1e-12)
        corr[cross <= 0] = -math.inf
        corr.fill_diagonal_(-math.inf)
        top = min(CORRELATED_PER_FEATURE, self.d_sae - 1)
        if top <= 0:
            return empty
        values, others = torch.topk(corr, top, dim=1)
        keep = torch.isfinite(values)
        feature = torch.arange(self.d_sae)[:, None].expand_as(others)
        return pa.table({
            "feature": pa.array(feature[keep].numpy().astype(np.int32)),
            "other": pa.array(others[keep].numpy().astype(np.int32)),
            "corr": pa.array(values[keep].numpy().astype(np.float32)),
        })


def _sae_rows(store: Store, report: FeaturePassReport) -> pd.DataFrame:
    """The saes table with this SAE's row inserted or replaced."""
    row = pd.DataFrame([asdict(report)])
    if SAES_TABLE in store.views():
        old = store.df(f"SELECT * FROM {SAES_TABLE} WHERE name <> ?", [report.name])
        row = pd.concat([old, row], ignore_index=True) if len(old) else row
    return row.sort_values("name").reset_index(drop=True)


@torch.no_grad()
def run_feature_pass(
    store: Store,
    folder: str | Path,
    name: str | None = None,
    hook: str | None = None,
    chunk_tokens: int = 16384,
    corr_tokens: int = 100_000,
    device: str = "cpu",
    sort_rows: int = RUN_ROWS,
) -> FeaturePassReport:
    """Encode every stored activation of the SAE's hook and publish the feature tables and
    the SAE's saes row as one unit. Rows are sorted externally, sort_rows at a time, so
    memory does not grow with the store."""
    started = time.perf_counter()
    folder = Path(folder)
    model, cfg = load_sae(folder, device=device)
    hook = _sae_hook(cfg, hook, folder)
    name = sae_name(folder) if name is None else name
    if not re.fullmatch(r"[0-9A-Za-z_]+", name):
        raise WorkbenchError(f"SAE name '{name}' must be letters, digits and underscores")
    _check_fits(store, cfg, hook, model, folder)
    if sort_rows <= 0:
        raise WorkbenchError(f"--sort-rows must be positive, got {sort_rows}")
    # a transcoder's features come from its input hook; its FVU is of its target's prediction
    target_hook = _target_hook(store, cfg, model, folder)
    acc = _Accumulator(model.d_out, model.d_sae, corr_tokens)
    unit = TableUnit(store.root, FEATURES_GROUP)
    sorter = RowSorter(unit.scratch, run_rows=sort_rows)
    offset = 0
    targets = finite_activations(store, target_hook, chunk_tokens) if target_hook is not None else None
    try:
        for chunk in finite_activations(store, hook, chunk_tokens):
            x = chunk.to(device)
            code = model.encode(x)
            x_hat = model.output(x, code)
            indices, values = code.indices.cpu(), code.values.float().cpu()
            acc.add(next(targets) if targets is not None else x.cpu(), x_hat.cpu(), indices, values)
            active = values > 0
            rows = torch.arange(offset, offset + len(x))[:, None].expand_as(indices)
            sorter.add(indices[active].numpy().astype(np.int32), values[active].numpy(), rows[active].numpy())
            offset += len(x)
    except BaseException:  # a refused or interrupted pass leaves nothing in the store
        unit.discard()
        raise
    report = FeaturePassReport(
        name=name,
        folder=str(folder.resolve()),
        hook=hook,
        rule=training_rule(folder, cfg),
        d_in=model.d_in,
        d_sae=model.d_sae,
        tokens=acc.tokens,
        rows=sorter.rows,
        l0=sorter.rows / max(acc.tokens, 1),
        fvu=acc.fvu(),
        dead_fraction=float((acc.count == 0).float().mean()),
        corr_tokens=acc.corr_seen,
        seconds=time.perf_counter() - started,
    )
    with unit:
        unit.write_file(features_table(name), lambda path: sorter.finish(path, FEATURE_ROW_GROUP))
        unit.write_table(stats_table(name), acc.stats())
        unit.write_table(corr_table(name), acc.correlations())
        report.seconds = time.perf_counter() - started  # the sort and the writes count too
        unit.write_table(SAES_TABLE, _sae_rows(store, report))
    return report
