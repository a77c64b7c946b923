"""Capture throughput against a bare forward pass of the same model and batches, and store ingest MB/s.

    python bench/capture.py --models tiny-relu,tiny-moe --tokens 65536            # CPU, zoo models
    python bench/capture.py --models gpt2-small-shaped --device cuda --tokens 1048576

The goal: the store is never the bottleneck, i.e. capture tokens/s within 15% of the bare
forward pass (same model, ctx, batch, stop layer). gpt2-small-shaped is a randomly
initialised HookedTransformer with GPT-2 small's shape (no hub needed); its speed is what
matters here, not its weights. Prints a markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch

from workbench.capture.runner import CaptureSettings, run_capture
from workbench.capture.texts import load_corpus
from workbench.capture.windows import iter_batches, iter_windows
from workbench.models.handle import ModelHandle
from workbench.models.registry import load_model
from workbench.store.encoding import encode_activations
from workbench.store.writer import commit_batch


def gpt2_small_shaped(device: str) -> ModelHandle:
    """GPT-2 small's architecture with random weights and the zoo tokenizer (ids clipped to its vocab)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    zoo = load_model("tiny-relu")
    cfg = HookedTransformerConfig(
        n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, n_ctx=1024,
        d_vocab=50257, act_fn="gelu_new", normalization_type="LN", device=device, seed=0,
    )
    model = HookedTransformer(cfg).eval()
    return ModelHandle(
        name="gpt2-small-shaped", model=model, tokenizer=zoo.tokenizer, fingerprint=hashlib.sha256(b"seed0").hexdigest()[:12],
        prefix_ids=zoo.prefix_ids, n_layers=12, d_model=768,
    )


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bare_forward_rate(handle: ModelHandle, batches: list[torch.Tensor], stop_at: int | None, device: str) -> float:
    """Tokens/s of the model alone over pre-tokenised batches already on the device."""
    on_device = [b.to(device) for b in batches]
    kwargs = {"stop_at_layer": stop_at} if stop_at is not None else {}
    with torch.inference_mode():
        handle.model(on_device[0], return_type=None, **kwargs)  # warm-up
        sync(device)
        start = time.perf_counter()
        for ids in on_device:
            handle.model(ids, return_type=None, **kwargs)
        sync(device)
    return sum(b.numel() for b in batches) / (time.perf_counter() - start)


def ingest_rate(d: int, rows: int, batches: int) -> float:
    """MB/s of encoding + writing + publishing batches of float32 activations."""
    root = Path(tempfile.mkdtemp())
    tables = [
        {"act.bench": pa.table({"token_index": pa.array(range(i * rows, (i + 1) * rows), pa.int64()),
                                "act": encode_activations(torch.randn(rows, d), "float32")})}
        for i in range(batches)
    ]
    start = time.perf_counter()
    written = 0
    for i, batch in enumerate(tables):
        folder = commit_batch(root, i, batch)
        written += sum(f.stat().st_size for f in folder.iterdir())
    rate = written / (time.perf_counter() - start) / 1e6
    shutil.rmtree(root)
    return rate


def bench_model(name: str, device: str, tokens: int, ctx: int, batch_size: int, hooks: list[str], dtype: str, repeats: int) -> dict[str, object]:
    handle = gpt2_small_shaped(device) if name == "gpt2-small-shaped" else load_model(name, device=device)
    hooks = handle.resolve_hooks(hooks)
    corpus = load_corpus("builtin")
    n_batches = max(tokens // (ctx * batch_size), 1)
    batches: list[torch.Tensor] = []
    for _, ids, _ in iter_batches(iter_windows(handle, corpus.documents, ctx), batch_size, skip=set(), last=n_batches - 1):
        batches.append(ids)
        if len(batches) == n_batches:
            break
    stop_at = handle.stop_layer_for(hooks)
    bares, captures, mb_rates = [], [], []
    for _ in range(repeats):  # alternated, and the best of each reported: a shared machine's speed varies from run to run
        bares.append(bare_forward_rate(handle, batches, stop_at, device))
        store = Path(tempfile.mkdtemp()) / "store"
        settings = CaptureSettings(model=name, data="builtin", hooks=hooks, tokens=n_batches * ctx * batch_size, ctx=ctx,
                                   batch_size=batch_size, store=str(store), device=device, dtype=dtype)
        report = run_capture(settings, handle=handle, progress=False)
        stored_mb = sum(f.stat().st_size for f in store.rglob("*.parquet")) / 1e6
        shutil.rmtree(store.parent)
        captures.append(report.new_tokens / report.seconds)
        mb_rates.append(stored_mb / report.seconds)
    bare, capture = max(bares), max(captures)
    d = sum(int(torch.tensor(handle.hook_shapes([h])[h]).prod()) for h in hooks)
    return {
        "model": name, "device": device, "dtype": dtype, "hooks": ",".join(hooks), "floats/token": d,
        "ctx x batch": f"{ctx} x {batch_size}", "tokens": n_batches * ctx * batch_size, "bare forward tok/s": bare, "capture tok/s": capture,
        "capture/bare": capture / bare, "store MB/s during capture": max(mb_rates),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-relu,tiny-moe")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hooks", default="blocks.*.hook_resid_post")
    parser.add_argument("--dtype", default="float32", help="stored precision")
    parser.add_argument("--repeats", type=int, default=3, help="alternated bare/capture runs; the best of each is reported")
    args = parser.parse_args()
    rows = [
        bench_model(m, args.device, args.tokens, args.ctx, args.batch_size, args.hooks.split(","), args.dtype, args.repeats)
        for m in args.models.split(",")
    ]
    where = (
        torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    print(f"\nmachine: {where}; torch {torch.__version__}")
    print("| model | device | stored dtype | hooks | floats/token | tokens | ctx x batch | bare forward tok/s | capture tok/s "
          "| capture/bare | store MB/s during capture |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['device']} | {r['dtype']} | {r['hooks']} | {r['floats/token']} | {r['tokens']} | {r['ctx x batch']} | "
            f"{r['bare forward tok/s']:,.0f} | {r['capture tok/s']:,.0f} | {r['capture/bare']:.2f} | {r['store MB/s during capture']:.0f} |"
        )
    print(f"\nstore ingest alone (encode + write + publish, float32, 768 floats x 16384 rows x 8 batches): {ingest_rate(768, 16384, 8):,.0f} MB/s")


if __name__ == "__main__":
    main()
