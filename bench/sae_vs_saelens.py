"""Quality against a peer: our TopK trainer vs SAELens's TopK training SAE on the same
activations (one model's residual stream from a store), with the same width, k, batch size,
learning rate and number of tokens. Both SAEs are scored by the same code (our evaluation
on a held-out tail of the store that neither trained on): FVU, L0, dead fraction.

Both trainers read the identical batch stream (our shuffled StoreSource). Each keeps its own
recipe otherwise: SAELens's defaults (constant LR, expected-average-norm scaling, decoder
init norm 0.1, decoder-norm-rescaled TopK, AuxK with its 1000-step dead window) against ours
(warm-up + final linear decay, unit-mean-square scaling, unit-norm decoder rows, AuxK
normalised by the residual's variance, dead window set to the same 1000 steps). A third row
runs ours with SAELens's constant schedule, to separate the schedule from the rest.

    python bench/sae_vs_saelens.py --model tiny-relu --hook blocks.2.hook_resid_post
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from sae.config import TrainConfig
from sae.io import load_sae
from sae.trainer import Trainer
from workbench import Store
from workbench.evaluation import store_reconstruction_metrics
from workbench.training_data import StoreSource


def ensure_store(args: argparse.Namespace) -> Store:
    path = Path(args.store)
    if not (path / "store.json").exists():
        subprocess.run(
            [sys.executable, "-m", "workbench.cli", "capture", "--model", args.model, "--data", "builtin", "--hooks", args.hook,
             "--tokens", str(args.capture_tokens), "--ctx", str(args.ctx), "--batch-size", "32", "--store", str(path)],
            check=True,
        )  # fmt: skip
    return Store.open(path)


def train_ours(args, source, d_in, out: Path, constant_lr: bool) -> float:
    config = TrainConfig(
        arch="topk", d_in=d_in, d_sae=args.expansion * d_in, k=args.k, tokens=args.tokens, batch_size=args.batch_size,
        lr=args.lr, seed=args.seed, dead_tokens=1000 * args.batch_size, aux="auxk",
        **({"warmup_steps": 0, "decay_fraction": 0.0} if constant_lr else {}),
    )  # fmt: skip
    started = time.perf_counter()
    trainer = Trainer.start(config, source, out=out, command=["bench/sae_vs_saelens.py"])
    trainer.fit(progress=False)
    return time.perf_counter() - started


def train_saelens(args, source, d_in, out: Path) -> float:
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(args.seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=args.expansion * d_in, k=args.k,
                                                normalize_activations="expected_average_only_in"))  # fmt: skip
    trainer_cfg = SAETrainerConfig(
        total_training_samples=args.tokens, train_batch_size_samples=args.batch_size, lr=args.lr, lr_end=args.lr, device="cpu",
        dead_feature_window=1000, feature_sampling_window=2000, n_batches_for_norm_estimate=16,
        logger=LoggingConfig(log_to_wandb=False),
    )  # fmt: skip
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained = SAETrainer(trainer_cfg, sae, iter(source.batches(args.batch_size, 0))).fit()
    seconds = time.perf_counter() - started
    trained.save_inference_model(out)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-relu")
    parser.add_argument("--hook", default="blocks.2.hook_resid_post")
    parser.add_argument("--store", default=str(Path(tempfile.gettempdir()) / "sae-bench-store"))
    parser.add_argument("--capture-tokens", type=int, default=300_000)
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--holdout", type=int, default=32_768, help="last N stored tokens: evaluation only")
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "sae-bench-runs"))
    parser.add_argument("--only", default=None, help="run only the runs whose name starts with this")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    store = ensure_store(args)
    n = store.n_tokens()
    train_stop = n - args.holdout

    def source() -> StoreSource:
        return StoreSource(store, args.hook, chunk_tokens=32768, buffer_chunks=4, seed=args.seed, stop=train_stop)

    d_in = source().d_in
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {
        "ours (TopK, AuxK)": lambda p: train_ours(args, source(), d_in, p, constant_lr=False),
        "ours, constant LR": lambda p: train_ours(args, source(), d_in, p, constant_lr=True),
        "SAELens TopKTrainingSAE": lambda p: train_saelens(args, source(), d_in, p),
    }
    rows = []
    for name, train in runs.items():
        if args.only and not name.startswith(args.only):
            continue
        folder = out / name.split()[0].lower().strip(",") / ("const" if "constant" in name else "default")
        seconds = train(folder)
        sae, _ = load_sae(folder)
        metrics = store_reconstruction_metrics(sae, store, args.hook, start=train_stop)
        row = {"run": name, "fvu": metrics["fvu"], "l0": metrics["l0"], "dead": metrics["dead_fraction"],
               "seconds": seconds, "eval_tokens": metrics["tokens"]}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print(f"model {store.model_name}, hook {args.hook}, d_in {d_in}, d_sae {args.expansion * d_in}, k {args.k}, "
          f"batch {args.batch_size}, lr {args.lr}, {args.tokens:,} training tokens from {train_stop:,} stored, "
          f"eval on the last {n - train_stop:,}; {platform.machine()}, torch {torch.__version__}, {args.threads} threads")  # fmt: skip
    print("| run | FVU (held out) | L0 | dead fraction | train s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['fvu']:.4f} | {r['l0']:.2f} | {r['dead']:.4f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
