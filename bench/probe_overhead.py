"""Capture tokens/s with and without the phenomenon probes, same model, data and hooks.

    python bench/probe_overhead.py --model minilm --data english.txt --tokens 8192 --ctx 128 --batch-size 8

Runs the two captures alternately `--repeats` times into fresh temporary stores (the model is
loaded once) and prints, per run, tokens per wall second and tokens per CPU second of this
process (all threads; steadier than wall time on a machine shared with other jobs), then the
median slowdown of each. The stored hook is the last block's residual stream in both runs,
so the difference is the probes' own cost.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from workbench.capture.runner import CaptureSettings, run_capture
from workbench.models.registry import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", default="builtin")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--probes", default="all")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    handle = load_model(args.model)
    hook = f"blocks.{handle.n_layers - 1}.hook_resid_post"
    rates: dict[str, list[float]] = {"none": [], args.probes: []}
    cpu_rates: dict[str, list[float]] = {"none": [], args.probes: []}
    for _ in range(args.repeats):
        for probes in rates:
            with tempfile.TemporaryDirectory() as folder:
                settings = CaptureSettings(
                    model=args.model, data=args.data, hooks=[hook], tokens=args.tokens, ctx=args.ctx,
                    batch_size=args.batch_size, store=str(Path(folder) / "s"), probes=[] if probes == "none" else probes.split(","),
                )  # fmt: skip
                cpu = time.process_time()
                report = run_capture(settings, handle=handle, progress=False)
                cpu = time.process_time() - cpu
                rates[probes].append(report.new_tokens / report.seconds)
                cpu_rates[probes].append(report.new_tokens / cpu)
                print(f"probes={probes:<28} {rates[probes][-1]:8.0f} tok/s wall {cpu_rates[probes][-1]:8.0f} tok/CPU-s", flush=True)
    for name, table in (("wall", rates), ("CPU", cpu_rates)):
        base, probed = statistics.median(table["none"]), statistics.median(table[args.probes])
        print(f"median {name}: without {base:.0f}, with --probes {args.probes} {probed:.0f} tok/s, slowdown x{base / probed:.2f}")


if __name__ == "__main__":
    main()
