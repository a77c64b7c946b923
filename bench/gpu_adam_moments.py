"""Does storing Adam's moments in bf16 (stochastic rounding) cost the fused step quality?
(device GPU; not a test)

bench/gpu_train.py times the step with bf16 moments; its FVU there is after 150 steps,
shorter than the second moment's memory (beta2 = 0.999: ~1000 steps). Here
sae.fused_step.FusedTopKStep trains from one init on one data stream twice, float32 and
bfloat16 moments, for --steps steps, and reports held-out FVU along the way and the
relative difference of the weights between the two runs at the end. For scale, a third
run with float32 moments starts from another init (what a seed alone changes).
Data: gpu_train.synthetic_pool, --pool distinct batches cycled (the same order for both).

    python3 bench/gpu_adam_moments.py [--configs 0,1] [--steps 4000] [--pool 64]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from gpu_train import CONFIGS, LR, fvu_of, synthetic_pool  # noqa: E402

from sae.fused_step import FusedTopKStep  # noqa: E402
from sae.model import SparseAutoencoder  # noqa: E402
from sae.rules import TopKRule  # noqa: E402


def train(shape, pool, x_eval, steps: int, moments_dtype: torch.dtype, every: int, seed: int) -> tuple[list[dict], SparseAutoencoder]:
    d_in, d_sae, k, _ = shape
    model = SparseAutoencoder(d_in, d_sae, TopKRule(k))
    model.init_weights(torch.Generator().manual_seed(seed), b_dec=pool[0].mean(0).cpu())
    model = model.cuda()
    model.make_encoder_feature_major()
    fused = FusedTopKStep(model, lr=LR, moments_dtype=moments_dtype)
    curve = []
    for step in range(1, steps + 1):
        fused(pool[step % len(pool)])
        if step % every == 0 or step == steps:
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                curve.append({"step": step, "fvu": fvu_of(x_eval, model(x_eval)[0])})
    return curve, model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="0,1")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--pool", type=int, default=64)
    ap.add_argument("--every", type=int, default=500)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for ci in (int(c) for c in args.configs.split(",")):
        shape = CONFIGS[ci]
        pool = synthetic_pool(shape[0], shape[2], shape[3], args.pool + 1, seed=ci)
        x_eval = pool.pop()
        curves, models = {}, {}
        for name, dtype, seed in (("float32", torch.float32, 0), ("bfloat16", torch.bfloat16, 0), ("float32, init seed 1", torch.float32, 1)):
            curves[name], models[name] = train(shape, pool, x_eval, args.steps, dtype, args.every, seed)
        a, b = dict(models["float32"].named_parameters()), dict(models["bfloat16"].named_parameters())
        diff = {n: float((a[n] - b[n]).norm() / a[n].norm()) for n in a}
        row = {"config": "x".join(map(str, shape)), "steps": args.steps, "pool": args.pool,
               "fvu_float32_moments": curves["float32"], "fvu_bfloat16_moments": curves["bfloat16"],
               "fvu_float32_moments_init_seed_1": curves["float32, init seed 1"],
               "weights_rel_diff_at_end": diff}
        print(json.dumps(row), flush=True)
        print("| step | FVU, float32 moments | FVU, bf16 moments | difference | float32, another init | difference |\n|---|---|---|---|---|---|")
        for f32, bf, other in zip(curves["float32"], curves["bfloat16"], curves["float32, init seed 1"]):
            print(f"| {f32['step']} | {f32['fvu']:.4f} | {bf['fvu']:.4f} | {100 * (bf['fvu'] / f32['fvu'] - 1):+.2f}% "
                  f"| {other['fvu']:.4f} | {100 * (other['fvu'] / f32['fvu'] - 1):+.2f}% |")
        del pool, x_eval, models
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
