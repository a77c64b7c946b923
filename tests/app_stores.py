"""Small real stores for the app's tests: captures of the tiny test models through the real
runner, three SAEs (TopK, Mutual Choice, GBA) trained on one hook with their training records,
their feature passes, a zoo model's store (tiny-relu, which the app can load, so the
pages that run the model have one) with one TopK SAE, and an encoder's store (MiniLM's sinks
on the builtin-english corpus, for the special-token sections)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from sae.config import TrainConfig
from sae.trainer import Trainer
from tests.phenomena_models import capture, dense_config, handle_for, moe_config
from workbench import Store
from workbench.analysis.features import run_feature_pass
from workbench.capture.runner import CaptureSettings, run_capture
from workbench.models.english_corpus import ENGLISH_SPEC
from workbench.models.registry import load_model
from workbench.training_data import StoreSource

HOOK = "blocks.1.hook_resid_post"
ZOO_HOOK = "blocks.2.hook_resid_post"
RULES = {"topk": 4, "mutual-choice": 4, "gba": None}


def dense_store(folder: Path, tokens: int = 4000) -> Store:
    """A dense ReLU model's store with lazy + sinks probes and the residual stream of block 1."""
    folder.mkdir(parents=True, exist_ok=True)
    return capture(handle_for(dense_config()), folder, ["lazy", "sinks"], tokens=tokens, ctx=48, batch_size=8, hooks=[HOOK])


def moe_store(folder: Path, tokens: int = 1000) -> Store:
    """An MoE model's store with the lazy (per-expert), experts, sinks and routing probes."""
    folder.mkdir(parents=True, exist_ok=True)
    probes = ["lazy", "experts", "sinks", "routing"]
    return capture(handle_for(moe_config(), name="planted-moe"), folder, probes, tokens=tokens, ctx=48, batch_size=8)


def train_saes(store: Store, folder: Path, d_sae: int = 64, tokens: int = 2048) -> list[Path]:
    """One SAE per rule on HOOK, each passed over the store; returns their folders."""
    folders = []
    for arch, k in RULES.items():
        config = TrainConfig(arch=arch, d_in=32, d_sae=d_sae, tokens=tokens, k=k, batch_size=256, gba_every=2, init_tokens=1024)
        out = folder / f"sae-{arch}"
        Trainer.start(config, StoreSource(store, HOOK, chunk_tokens=1024), out).fit(progress=False)  # SAE + training.json
        run_feature_pass(store, out, corr_tokens=2000)
        folders.append(out)
    return folders


@dataclass(frozen=True)
class DemoStores:
    dense: Path
    moe: Path
    saes: list[Path]
    zoo: Path
    zoo_sae: Path
    minilm: Path


def demo_stores(base: Path) -> DemoStores:
    """The dense store with three SAEs and the MoE store, built once under base per session
    (the page tests and the browser test share them)."""
    root = base / "app-demo"
    if not (root / "built").exists():
        shutil.rmtree(root, ignore_errors=True)
        dense = dense_store(root / "dense")
        moe_store(root / "moe")
        train_saes(dense, root / "saes")
        zoo_store(root / "zoo")
        minilm_store(root / "minilm")
        (root / "built").touch()
    return DemoStores(root / "dense" / "store", root / "moe" / "store", sorted((root / "saes").iterdir()),
                      root / "zoo" / "store", root / "zoo" / "sae-topk", root / "minilm" / "store")  # fmt: skip


def minilm_store(folder: Path, tokens: int = 1024) -> Store:
    """all-MiniLM-L6-v2's sinks probe over the builtin-english corpus (the demo's MiniLM data)."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = CaptureSettings(model="all-MiniLM-L6-v2", data=ENGLISH_SPEC, hooks=[], tokens=tokens, ctx=64, batch_size=4,
                               store=str(folder / "store"), probes=["sinks"])  # fmt: skip
    run_capture(settings, handle=load_model("minilm"), progress=False)
    return Store.open(folder / "store")


def zoo_store(folder: Path, tokens: int = 1500) -> Store:
    """tiny-relu's residual stream at ZOO_HOOK and one TopK SAE on it (folder/sae-topk, with its
    training record), passed over the store."""
    folder.mkdir(parents=True, exist_ok=True)
    store = capture(load_model("tiny-relu"), folder, [], tokens=tokens, ctx=64, batch_size=8, hooks=[ZOO_HOOK])
    config = TrainConfig(arch="topk", d_in=192, d_sae=256, tokens=2048, k=8, batch_size=256, init_tokens=1024)
    Trainer.start(config, StoreSource(store, ZOO_HOOK, chunk_tokens=1024), folder / "sae-topk").fit(progress=False)
    run_feature_pass(store, folder / "sae-topk", corr_tokens=1500)
    return store
