"""Peak memory of `workbench features` against the store's size: goal, 400k tokens within 1.3x
of 40k tokens with the same SAE (issue 16).

    python bench/feature_pass_memory.py                               # builds everything under /tmp
    python bench/feature_pass_memory.py --folder /tmp/fpm --small 40000 --large 400000

Captures two stores of tiny-relu's blocks.1.hook_resid_post with the real commands
(`workbench capture --model tiny-relu --data builtin --ctx 128 --batch-size 32`), trains one
TopK SAE on the small store (`workbench train --arch topk --expansion 8 --k 16 --tokens 200000
--batch-size 1024`), then runs `workbench features` on each store as its own process and reads
that process's peak resident memory from the kernel (os.wait4), the median of --repeat runs
(the encode loop's allocations make one run's peak vary by some tens of MiB). It does the same
for loading the app's TokenText of each store. Stores and SAE already in --folder are reused;
rerun the same command to measure again. Prints a markdown table and the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

HOOK = "blocks.1.hook_resid_post"
TOKEN_TEXT = "import sys; from workbench import Store; from workbench.analysis.feature_page import TokenText; TokenText(Store.open(sys.argv[1]))"


def peak_mb(argv: list[str]) -> float:
    """Run argv to completion (output discarded) and return its peak RSS in MiB."""
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{child.stderr.read().decode()}")
    return usage.ru_maxrss / 1024


def workbench(*args: str) -> list[str]:
    return [sys.executable, "-m", "workbench.cli", *args]


def build(folder: Path, tokens: int) -> Path:
    store = folder / f"store-{tokens}"
    if not (store / "store.json").exists():
        subprocess.run(workbench("capture", "--model", "tiny-relu", "--data", "builtin", "--hooks", HOOK, "--tokens", str(tokens),
                                 "--ctx", "128", "--batch-size", "32", "--store", str(store)), check=True)  # fmt: skip
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default="/tmp/feature-pass-memory")
    parser.add_argument("--small", type=int, default=40_000)
    parser.add_argument("--large", type=int, default=400_000)
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (the median is reported)")
    args = parser.parse_args()
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    stores = [build(folder, args.small), build(folder, args.large)]
    sae = folder / "sae"
    if not (sae / "cfg.json").exists():
        subprocess.run(workbench("train", "--store", str(stores[0]), "--hook", HOOK, "--arch", "topk", "--expansion", "8", "--k", "16",
                                 "--tokens", "200000", "--batch-size", "1024", "--out", str(sae)), check=True)  # fmt: skip
    features = [statistics.median(peak_mb(workbench("features", str(sae), "--store", str(s))) for _ in range(args.repeat)) for s in stores]
    text = [statistics.median(peak_mb([sys.executable, "-c", TOKEN_TEXT, str(s)]) for _ in range(args.repeat)) for s in stores]
    print("| store tokens | `workbench features` peak RSS MiB | TokenText load peak RSS MiB |")
    print("|---|---|---|")
    for tokens, f, t in zip((args.small, args.large), features, text):
        print(f"| {tokens:,} | {f:.0f} | {t:.0f} |")
    print(f"workbench features: {features[1]:.0f} / {features[0]:.0f} MiB = {features[1] / features[0]:.2f}x (goal <= 1.3x)")
    print(f"TokenText: {text[1]:.0f} / {text[0]:.0f} MiB = {text[1] / text[0]:.2f}x")


if __name__ == "__main__":
    main()
