"""A feature page's data at 1M tokens: goal under 100 ms (issue 6).

    python bench/feature_page.py --tokens 1000000                                # tiny-relu-shaped, random weights
    python bench/feature_page.py --model tiny-relu --hook blocks.2.hook_resid_post # any registry model
    python bench/feature_page.py --store stores/relu --sae runs/sae-topk     # an existing store and SAE

Captures (or reuses) a store, runs the feature pass (`workbench features`) with the given SAE
or a randomly initialised TopK SAE (k=32, d_sae=4096: the page's cost depends on how many
rows a feature has, not on what it means), then times FeatureTables.page for random live
features, the way the app calls it: the store's tokens held in memory (TokenText, loaded once
per store and timed separately), one Parquet query per page. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from sae.io import save_sae
from sae.model import SparseAutoencoder
from sae.rules import TopKRule
from workbench.analysis.feature_page import FeatureTables, TokenText
from workbench.analysis.features import run_feature_pass
from workbench.capture.runner import CaptureSettings, run_capture
from workbench.models.handle import ModelHandle
from workbench.models.registry import load_model
from workbench.models.zoo import TOKENIZER_FILE, load_zoo_tokenizer, zoo_dir, zoo_spec
from workbench.store.reader import Store

RANDOM_MODEL = "tiny-relu-shaped"


def tiny_relu_shaped() -> ModelHandle:
    """tiny-relu's architecture and tokenizer with random weights: as fast to capture, no training needed."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    tokenizer = load_zoo_tokenizer(zoo_dir("tiny-relu") / TOKENIZER_FILE)
    config = zoo_spec("tiny-relu").hooked_config(len(tokenizer))
    model = HookedTransformer(HookedTransformerConfig(**{**config, "seed": 0}), tokenizer=tokenizer).eval()
    return ModelHandle(
        name=RANDOM_MODEL, model=model, tokenizer=tokenizer, fingerprint="random-seed0", kind="decoder",
        prefix_ids=[tokenizer.bos_token_id], suffix_ids=[], n_layers=model.cfg.n_layers, d_model=model.cfg.d_model,
        extra={"probe_token_id": tokenizer.bos_token_id},
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="stores/bench-feature-page")
    parser.add_argument("--model", default=RANDOM_MODEL, help=f"{RANDOM_MODEL} or any workbench model spec")
    parser.add_argument("--hook", default="blocks.2.hook_resid_post")
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--sae", default=None, help="SAE folder; default: a random TopK SAE")
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--pages", type=int, default=50)
    args = parser.parse_args()

    root = Path(args.store)
    if not (root / "store.json").exists() or Store.open(root).n_tokens() < args.tokens:
        started = time.perf_counter()
        handle = tiny_relu_shaped() if args.model == RANDOM_MODEL else load_model(args.model)
        run_capture(CaptureSettings(model=args.model, data="builtin", hooks=[args.hook], tokens=args.tokens, ctx=128,
                                    batch_size=32, store=str(root)), handle=handle)  # fmt: skip
        print(f"capture: {time.perf_counter() - started:.0f} s")
    store = Store.open(root)
    sae = Path(args.sae) if args.sae else root.parent / f"{root.name}-random-topk"
    if not args.sae:
        d_in = int(np.prod(store.hooks[args.hook]["shape"]))
        model = SparseAutoencoder(d_in, args.d_sae, TopKRule(args.k))
        model.init_weights(torch.Generator().manual_seed(0))
        save_sae(sae, model, metadata={"hook_name": args.hook, "model_name": store.model_name})
    report = run_feature_pass(store, sae)
    print(f"feature pass: {report.tokens:,} tokens, {report.rows:,} rows in {report.seconds:.1f} s")

    started = time.perf_counter()
    text = TokenText(store)
    tables = FeatureTables(store, report.name)
    load_s = time.perf_counter() - started
    live = tables.stats[tables.stats["count"] > 0]
    rng = np.random.default_rng(0)
    features = rng.choice(live["feature"].to_numpy(), size=min(args.pages, len(live)), replace=False)
    tables.page(int(features[0]), text)  # first query warms DuckDB's import and the OS file cache
    times, rows = [], []
    for feature in features:
        started = time.perf_counter()
        page = tables.page(int(feature), text)
        times.append(1000 * (time.perf_counter() - started))
        rows.append(page.count)
    times.sort()
    busiest = int(live.sort_values("count").iloc[-1]["feature"])
    started = time.perf_counter()
    tables.page(busiest, text)
    busiest_ms = 1000 * (time.perf_counter() - started)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print("| tokens | rows | d_sae | pages | median ms | p95 ms | max ms | densest feature (rows) ms | tokens + tables load s |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {report.tokens:,} | {report.rows:,} | {report.d_sae} | {len(times)} | {statistics.median(times):.1f} | "
          f"{times[int(0.95 * (len(times) - 1))]:.1f} | {times[-1]:.1f} | "
          f"{busiest_ms:.1f} ({int(live['count'].max()):,}) | {load_s:.2f} |")  # fmt: skip
    print(f"rows per sampled feature: median {int(statistics.median(rows)):,}, max {max(rows):,}")
    common = store.df("SELECT token FROM tokens GROUP BY token ORDER BY count(*) DESC LIMIT 3")["token"].tolist()
    for token in common:
        started = time.perf_counter()
        found = tables.search_token(token)
        print(f"search by token {token!r}: {1000 * (time.perf_counter() - started):.0f} ms ({len(found)} features)")


if __name__ == "__main__":
    main()
