"""Ground-truth recovery benchmark: TopK, Mutual Choice, Feature Choice, GBA, JumpReLU and
Matryoshka trained on the same synthetic data: balanced, Zipf-imbalanced frequencies (a small
and a wide case), and the GBA paper's imbalanced case (n=128 features in d=42, half the tokens
with 3 active features, half with 20).

For every case and rule: FRR@0.9, FRR@0.8, mean matched |cos| (Hungarian matching of decoder
rows to true features), and on held-out data FVU, L0 and the dead fraction (features that
never fire on 32k held-out tokens). Prints a Markdown table (and writes JSON with --json).

    python bench/sae_synthetic.py                 # CPU, one core: 4 cases x 11 rules, 2M tokens each
    python bench/sae_synthetic.py --cases mixed   # one case (name prefix)
    python bench/sae_synthetic.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from sae.config import TrainConfig
from sae.metrics import ReconstructionStats
from sae.synthetic import SyntheticFeatures, SyntheticSource, recovery
from sae.trainer import Trainer

CASES = {
    # name: (n features, d, mean active per token, frequency law, d_sae)
    "balanced n=256 d=64": dict(n=256, d=64, mean_active=6.0, kind="balanced", d_sae=1024),
    "Zipf n=128 d=42": dict(n=128, d=42, mean_active=6.0, kind="zipf", d_sae=512),
    "Zipf n=512 d=64": dict(n=512, d=64, mean_active=8.0, kind="zipf", d_sae=2048),
    "mixed s=3/20 n=128 d=42 (GBA paper)": dict(n=128, d=42, sparsities=(3, 20), d_sae=512),
}


def make_features(case: dict, seed: int) -> SyntheticFeatures:
    if "sparsities" in case:
        return SyntheticFeatures.mixed_sparsity(case["n"], case["d"], case["sparsities"], seed=seed)
    return SyntheticFeatures.make(case["n"], case["d"], case["mean_active"], case["kind"], seed=seed)


def runs(case: dict, features: SyntheticFeatures) -> list[tuple[str, dict]]:
    """(label, TrainConfig overrides) for each rule. TopK at the mean active count and at a
    larger k (the paper's k=20 / k=30 on its case); GBA with its defaults (sae.rules.gba:
    10 groups, targets from d_sae, the paper's gamma and update period) and with the paper's
    LLM top target 0.5; JumpReLU with its defaults and with thresholds starting near the
    pre-activations' scale; Matryoshka BatchTopK at the mean active count."""
    mean = float(features.p.sum())
    ks = (20, 30) if "sparsities" in case else (round(mean), 2 * round(mean))
    return [
        (f"TopK k={ks[0]}", dict(arch="topk", k=ks[0])),
        (f"TopK k={ks[1]}", dict(arch="topk", k=ks[1])),
        (f"Mutual Choice k={round(mean)}", dict(arch="mutual-choice", k=round(mean))),
        (f"Mutual Choice k={round(mean)}, no aux", dict(arch="mutual-choice", k=round(mean), aux="none")),
        (f"Mutual Choice k={round(mean)}, AuxK", dict(arch="mutual-choice", k=round(mean), aux="auxk")),
        (f"Mutual Choice k={round(mean)}, no TopK start", dict(arch="mutual-choice", k=round(mean), topk_start=0.0)),
        (f"Feature Choice k={round(mean)}", dict(arch="feature-choice", k=round(mean))),
        ("GBA (defaults)", dict(arch="gba")),
        ("GBA, top target 0.5", dict(arch="gba", gba_p_max=0.5)),
        ("JumpReLU (defaults)", dict(arch="jumprelu")),
        ("JumpReLU, threshold start 0.1", dict(arch="jumprelu", jumprelu_init_threshold=0.1)),
        (f"Matryoshka k={round(mean)} (the paper's prefixes)", dict(arch="matryoshka", k=round(mean))),
    ]


@torch.no_grad()
def held_out(trainer: Trainer, features: SyntheticFeatures) -> dict[str, float]:
    model = trainer.model.eval()
    stats = ReconstructionStats(model.d_in, model.d_sae)
    for x in SyntheticSource(features, seed=10_000).batches(8192, 0):
        x = x.to(trainer.device) * trainer.input_scale
        code = model.encode(x)
        stats.update(x, model.decode(code), code)
        if stats.tokens >= 32768:
            break
    result = stats.result()
    return {"fvu": result["fvu"], "l0": result["l0"], "dead": result["dead_fraction"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2_000_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for these sizes)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--only", default=None, help="run only the rules whose label starts with this")
    parser.add_argument("--cases", default=None, help="run only the cases whose name starts with this")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for case_name, case in CASES.items():
        if args.cases and not case_name.startswith(args.cases):
            continue
        features = make_features(case, seed=args.seed + 1000)  # never the SAE init seed
        for label, overrides in runs(case, features):
            if args.only and not label.startswith(args.only):
                continue
            config = TrainConfig(
                d_in=case["d"], d_sae=case["d_sae"], tokens=args.tokens, batch_size=args.batch_size, lr=args.lr,
                device=args.device, seed=args.seed, dead_tokens=200_000, **overrides,
            )
            started = time.perf_counter()
            trainer = Trainer.start(config, SyntheticSource(features, seed=args.seed + 2000))
            trainer.fit(progress=False)
            seconds = time.perf_counter() - started
            row = {"case": case_name, "rule": label, **recovery(trainer.model.W_dec.detach().cpu(), features.V),
                   **held_out(trainer, features), "seconds": seconds}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, device {args.device}, "
          f"threads {args.threads}; tokens {args.tokens:,}, batch {args.batch_size}, lr {args.lr}")  # fmt: skip
    print("| case | rule | FRR@0.9 | FRR@0.8 | mean cos | FVU | L0 | dead | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['rule']} | {r['frr_0.9']:.3f} | {r['frr_0.8']:.3f} | {r['mean_cos']:.3f} | "
              f"{r['fvu']:.4f} | {r['l0']:.2f} | {r['dead']:.3f} | {r['seconds']:.0f} |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
