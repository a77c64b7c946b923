"""The user's path, end to end, each stage beside its in-memory counterpart measured in the same run.

    python bench/e2e.py                                  # this CPU: the zoo's tiny-relu
    python bench/e2e.py --preset gpu                     # a GPU: GPT-2-small-shaped checkpoint (768), 768x24576 k32
    python bench/e2e.py --preset gpu-2048                # a GPU: a 2048-wide checkpoint, 2048x65536 k64
    python bench/e2e.py --preset gpu --rules topk --json out.json

Stages (the CLI in subprocesses with default flags beyond the sizes, as a user runs it):
  capture      `workbench capture`            vs the bare forward pass of the same model and windows
  read         Store.iter_activations         vs pyarrow reading the same files raw (no copy out)
  train RULE   `workbench train --store`      vs the same trainer on batches already on the device
  train live   `workbench train --model`      vs the store path (no store kept)
  eval         `workbench eval`               tokens/s over the store
  features     `workbench features`           tokens/s over the store
  page         feature_page() per feature     ms (median over features)
Training rates are steady-state: tokens between the history rows after the first quarter of
the run, over the seconds between them (training.json's elapsed_s), so process start, model
load and kernel compilation are left out of both sides; the whole command's wall time is
printed too. The GPU presets build their checkpoint offline: GPT-2's architecture with random
weights and the zoo's tokenizer, saved by transformers, loaded by `--model DIR` like any local
Hugging Face folder.

On the lent GPU machine, whose image lacks some of the project's packages, carry them as wheels
(python 3.12, manylinux x86_64, --no-deps): duckdb, transformer-lens and the pure-Python packages
it imports that the image lacks (beartype, better-abc, datasets, dill, multiprocess,
fancy-einsum, typeguard); install them with `pip install --no-index --no-deps --target
/tmp/site .whl/*.whl` and run with PYTHONPATH=/tmp/site.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
#: Steps the baseline code trains and reads (it can be slow: a short run gives its rate).
BASELINE_STEPS = 250


@dataclass
class Preset:
    model: str  # a zoo name, or "gpt2-shaped:D_MODEL:LAYERS" built offline
    hook: str
    capture_tokens: int
    ctx: int
    capture_batch: int
    device: str
    d_sae: int
    k: int
    batch_size: int
    train_tokens: int
    rules: list[str] = field(default_factory=lambda: ["topk", "mutual-choice", "gba"])
    dtype: str = "float32"
    live_tokens: int = 0  # 0: the store path's train_tokens


PRESETS = {
    "cpu": Preset("tiny-relu", "blocks.2.hook_resid_post", 200_000, 128, 32, "cpu", 1536, 16, 1024, 1_000_000),
    "gpu": Preset("gpt2-shaped:768:12", "blocks.6.hook_resid_post", 2_000_000, 128, 64, "cuda", 24576, 32, 4096,
                  20_000_000, live_tokens=4_000_000),
    "gpu-2048": Preset("gpt2-shaped:2048:4", "blocks.2.hook_resid_post", 2_000_000, 128, 64, "cuda", 65536, 64, 4096,
                       20_000_000, rules=["topk"], dtype="bfloat16", live_tokens=4_000_000),
}


def build_checkpoint(spec: str, folder: Path) -> Path:
    """A GPT-2-architecture Hugging Face folder with random weights and the zoo tokenizer."""
    import transformers as tf

    from workbench.models.zoo import TOKENIZER_FILE, load_zoo_tokenizer, zoo_dir

    _, d_model, layers = spec.split(":")
    tokenizer = load_zoo_tokenizer(zoo_dir("tiny-relu") / TOKENIZER_FILE)
    special = tokenizer.bos_token_id
    torch.manual_seed(0)
    config = tf.GPT2Config(vocab_size=len(tokenizer), n_embd=int(d_model), n_layer=int(layers), n_head=int(d_model) // 64,
                           n_positions=1024, bos_token_id=special, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    tf.GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def workbench(*args: str, code: Path = REPO) -> tuple[float, str]:
    """Run `workbench ARGS` as a user does, from the checkout `code`; (wall seconds, stdout)."""
    start = time.perf_counter()
    path = os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-m", "workbench.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}, cwd=code)
    if done.returncode != 0:
        raise SystemExit(f"workbench {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start, done.stdout


def steady_rate(history: list[dict]) -> float:
    """Tokens/s between the first history row past a quarter of the run and the last."""
    rows = [r for r in history if "elapsed_s" in r]
    first = next(r for r in rows if r["step"] >= rows[-1]["step"] / 4)
    last = rows[-1]
    return (last["tokens"] - first["tokens"]) / max(last["elapsed_s"] - first["elapsed_s"], 1e-9)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bare_forward_rate(model: str, data: str, hook: str, tokens: int, ctx: int, batch: int, device: str) -> float:
    """The model alone over the same windows, tokenised beforehand, on the device."""
    from workbench.capture.texts import load_corpus
    from workbench.capture.windows import iter_windows
    from workbench.models.registry import load_model

    handle = load_model(model, device=device)
    hooks = handle.resolve_hooks([hook])
    stop = handle.stop_layer_for(hooks)
    windows = []
    for ids, _ in iter_windows(handle, load_corpus(data).documents, ctx):
        windows.append(torch.from_numpy(ids))
        if len(windows) * ctx >= tokens:
            break
    batches = [torch.stack(windows[i : i + batch]).to(device) for i in range(0, len(windows), batch)]
    with torch.no_grad():
        handle.run(batches[0], hooks, stop_at_layer=stop)
        sync(device)
        start = time.perf_counter()
        for ids in batches:
            handle.run(ids, hooks, stop_at_layer=stop)
        sync(device)
    return sum(b.numel() for b in batches) / (time.perf_counter() - start)


def read_rates(store_path: Path, hook: str) -> tuple[float, float, float]:
    """(iter_activations tok/s, raw pyarrow read tok/s, GB read) over the same files, page cache warm."""
    from workbench import Store

    store = Store.open(store_path)
    files = [f.path for f in store.activation_files(hook)]
    n = store.n_tokens()

    def raw() -> int:
        nbytes = 0
        for path in files:
            column = pq.read_table(path, columns=["act"], use_threads=True, memory_map=True).column("act")
            for chunk in column.chunks:
                nbytes += chunk.flatten().to_numpy(zero_copy_only=True).nbytes
        return nbytes

    nbytes = raw()  # warm the page cache for both
    start = time.perf_counter()
    raw()
    raw_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in store.iter_activations(hook):
        pass
    ours_s = time.perf_counter() - start
    return n / ours_s, n / raw_s, nbytes / 1e9


SOURCE_RATE = """
import sys, time, torch
try:
    from workbench.training_data import StoreSource
    extra = {"device": sys.argv[3]}
except ImportError:  # code from before the store source moved to workbench
    from sae.data import StoreSource
    extra = {}
from workbench import Store
device, batch, tokens = sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
source = StoreSource(Store.open(sys.argv[1]), sys.argv[2], **extra)
start, seen = None, 0
for x in source.batches(batch):
    x = x.to(device, torch.float32)
    if start is None:
        torch.cuda.synchronize() if device == "cuda" else None
        start = time.perf_counter()
        continue
    seen += len(x)
    if seen >= tokens:
        break
torch.cuda.synchronize() if device == "cuda" else None
print(seen / (time.perf_counter() - start))
"""


def source_rate(code: Path, store_path: Path, preset: Preset, tokens: int) -> float:
    """Tokens/s of the code's StoreSource alone, batches delivered to the device as float32
    (no training), in a process run from `code` (this checkout or an older one)."""
    done = subprocess.run([sys.executable, "-c", SOURCE_RATE, str(store_path), preset.hook, preset.device,
                           str(preset.batch_size), str(tokens)], capture_output=True, text=True, cwd=code,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")])})
    if done.returncode != 0:
        raise SystemExit(f"the source rate in {code} failed:\n{done.stderr[-3000:]}")
    return float(done.stdout.split()[-1])


def in_memory_train_rate(store_path: Path, preset: Preset, rule: str) -> tuple[float, float]:
    """The trainer `workbench train` picks, on the store's activations already on the device:
    (steady tok/s, final FVU)."""
    from sae.config import TrainConfig
    from sae.data import TensorSource
    from sae.trainer import Trainer
    from workbench import Store

    data = Store.open(store_path).activations(preset.hook).to(preset.device)
    config = TrainConfig(arch=rule, d_in=data.shape[1], d_sae=preset.d_sae, k=None if rule == "gba" else preset.k,
                         tokens=preset.train_tokens, batch_size=preset.batch_size, device=preset.device)
    trainer = Trainer.start(config, TensorSource(data, seed=0))
    trainer.fit(progress=False)
    rate, fvu = steady_rate(trainer.history), trainer.history[-1]["fvu"]
    del trainer, data
    if preset.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rate, fvu


def train_args(store_or_model: list[str], preset: Preset, rule: str, out: Path, tokens: int) -> list[str]:
    args = ["train", *store_or_model, "--hook", preset.hook, "--arch", rule, "--d-sae", str(preset.d_sae),
            "--tokens", str(tokens), "--batch-size", str(preset.batch_size), "--out", str(out),
            "--device", preset.device, "--no-progress"]
    return args if rule == "gba" else [*args, "--k", str(preset.k)]


def run(preset: Preset, work: Path, baseline: Path | None = None, evaluate: bool = True) -> list[dict]:
    rows: list[dict] = []

    def row(stage: str, ours: float, counterpart: float | None, against: str, unit: str = "tok/s", **extra) -> None:
        rows.append({"stage": stage, "ours": ours, "counterpart": counterpart, "against": against, "unit": unit, **extra})
        ratio = f"{ours / counterpart:.2f}" if counterpart else "-"
        print(f"  {stage:<22} {ours:>14,.1f} {unit:<6} vs {against:<40} {counterpart or 0:>14,.1f}  ratio {ratio}", flush=True)

    model = preset.model
    if model.startswith("gpt2-shaped"):
        model = str(build_checkpoint(model, work / "checkpoint"))
    store = work / "store"
    wall, printed = workbench("capture", "--model", model, "--data", "builtin", "--hooks", preset.hook, "--tokens",
                              str(preset.capture_tokens), "--ctx", str(preset.ctx), "--batch-size", str(preset.capture_batch),
                              "--store", str(store), "--device", preset.device, "--dtype", preset.dtype)
    bare = bare_forward_rate(model, "builtin", preset.hook, min(preset.capture_tokens, 500_000), preset.ctx,
                             preset.capture_batch, preset.device)
    capture_rate = float(printed.split(" new at ")[1].split(" tok/s")[0].replace(",", ""))  # the command's own loop
    row("capture (CLI)", capture_rate, bare, "bare forward pass, same windows", wall_s=wall)
    print(f"    wall {wall:.1f} s ({preset.capture_tokens / wall:,.0f} tok/s whole command: start, model and text load)")

    ours, raw, gb = read_rates(store, preset.hook)
    row("read iter_activations", ours, raw, f"raw pyarrow read of the files ({gb:.2f} GB)")

    batches = min(preset.train_tokens, 20 * preset.capture_tokens)
    row("store -> device batches", source_rate(REPO, store, preset, batches), None, "-")
    if baseline is not None:
        row("  same, baseline code", source_rate(baseline, store, preset, BASELINE_STEPS * preset.batch_size), None, "-")

    store_rate = {}
    for rule in preset.rules:
        out = work / f"run-{rule}"
        wall, _ = workbench(*train_args(["--store", str(store)], preset, rule, out, preset.train_tokens))
        record = json.loads((out / "training.json").read_text())
        store_rate[rule] = steady_rate(record["history"])
        memory, fvu = in_memory_train_rate(store, preset, rule)
        row(f"train {rule} (CLI)", store_rate[rule], memory, f"same trainer, batches on {preset.device}",
            wall_s=wall, wall_rate=preset.train_tokens / wall, fvu=record["history"][-1]["fvu"], fvu_in_memory=fvu,
            step_kind=record["step_kind"], resident=record["data"].get("resident"))
        print(f"    wall {wall:.1f} s ({preset.train_tokens / wall:,.0f} tok/s whole command), step {record['step_kind']}, "
              f"resident {record['data'].get('resident')}, fvu {record['history'][-1]['fvu']:.4f} (in memory {fvu:.4f})")

    rule = preset.rules[0]
    if baseline is not None:
        tokens = BASELINE_STEPS * preset.batch_size
        wall, _ = workbench(*train_args(["--store", str(store)], preset, rule, work / "run-baseline", tokens), code=baseline)
        record = json.loads((work / "run-baseline" / "training.json").read_text())
        row(f"train {rule} (baseline code)", record["history"][-1]["tokens_per_s"], store_rate[rule],
            "ours, steady (its rate: the loop's own, from its start)", wall_s=wall, wall_rate=tokens / wall)
    live_tokens = preset.live_tokens or preset.train_tokens
    out = work / "run-live"
    wall, _ = workbench(*train_args(["--model", model, "--ctx", str(preset.ctx)], preset, rule, out, live_tokens))
    record = json.loads((out / "training.json").read_text())
    row(f"train {rule} --model", steady_rate(record["history"]), store_rate[rule], "the store path", wall_s=wall)

    if not evaluate:
        return rows
    sae = work / f"run-{rule}"
    n = preset.capture_tokens
    wall, _ = workbench("eval", str(sae), "--store", str(store), "--split", "all", "--device", preset.device)
    row("eval (CLI wall)", n / wall, None, "-")
    wall, _ = workbench("features", str(sae), "--store", str(store), "--device", preset.device)
    row("features (CLI wall)", n / wall, None, "-")
    row("feature page", page_ms(store, sae), None, "-", unit="ms")
    return rows


def page_ms(store_path: Path, sae: Path) -> float:
    """Median ms of one feature page's data, as the app computes it, over the 20 most
    frequent features (the store's token text loaded once, as the app holds it)."""
    from workbench import Store
    from workbench.analysis.feature_page import FeatureTables, TokenText
    from workbench.analysis.features import sae_name

    store = Store.open(store_path)
    tables, text = FeatureTables(store, sae_name(sae)), TokenText(store)
    busiest = tables.stats.sort_values("count", ascending=False)["feature"].head(20).tolist()
    tables.page(int(busiest[0]), text)  # warm
    times = []
    for feature in busiest:
        start = time.perf_counter()
        tables.page(int(feature), text)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--rules", default=None, help="comma-separated rules to train (default: the preset's)")
    parser.add_argument("--train-tokens", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temporary one)")
    parser.add_argument("--capture-tokens", type=int, default=None)
    parser.add_argument("--no-eval", action="store_true", help="stop after training (no eval, features or page)")
    parser.add_argument("--baseline", default=None, help="an older checkout of the project (e.g. `git archive` of a commit) "
                        "whose store source and train command run beside ours")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    if args.rules:
        preset.rules = args.rules.split(",")
    if args.train_tokens:
        preset.train_tokens = args.train_tokens
    if args.capture_tokens:
        preset.capture_tokens = args.capture_tokens
    machine = torch.cuda.get_device_name() if preset.device == "cuda" else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"bench/e2e.py --preset {args.preset}: {machine}, torch {torch.__version__}", flush=True)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows = run(preset, work, Path(args.baseline).resolve() if args.baseline else None, not args.no_eval)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": args.preset, "machine": machine, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
