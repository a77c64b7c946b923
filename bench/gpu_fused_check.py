"""The fused TopK step on the GPU against the trainer's sequence of torch ops in float64
(device GPU; not a test: tests/test_fused_step.py checks the same under TRITON_INTERPRET on
CPU, this checks what the GPU compiler made of it).

For each shape: the same initial SAE trains 3 steps through sae.fused_step.FusedTopKStep on
CUDA (fp32 precision, TF32 off, pair chunks of 4: many features have a whole chunk) and through tests.test_fused_step.reference_train_step in
float64 on the CPU; prints the largest relative difference of each parameter. Then a bf16
run checks that the encoder's and decoder's bf16 copies equal torch's cast of the fp32 weights exactly
(the GPU rounds to nearest even; the CPU interpreter truncates).

Run: python bench/gpu_fused_check.py
"""

from __future__ import annotations

import copy
import os

os.environ["TRITON_INTERPRET"] = "0"  # the test module below defaults it to 1 for CPU runs

import torch

from sae.fused_step import FusedTopKStep
from sae.model import SparseAutoencoder
from sae.rules import TopKRule
from tests.test_fused_step import reference_train_step

SHAPES = [(256, 2048, 16, 512), (768, 4096, 32, 1024), (1000, 3001, 7, 333)]


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"device: {torch.cuda.get_device_name()}")
    worst = 0.0
    for d_in, d_sae, k, B in SHAPES:
        gen = torch.Generator().manual_seed(d_sae)
        model = SparseAutoencoder(d_in, d_sae, TopKRule(k))
        model.init_weights(gen, b_dec=torch.randn(d_in, generator=gen) * 0.1)
        model64 = copy.deepcopy(model).double()
        opt = torch.optim.Adam(model64.parameters(), lr=1e-3, foreach=False)
        model = model.cuda()
        model.make_encoder_feature_major()
        fused = FusedTopKStep(model, lr=1e-3, precision="fp32", pair_chunk=4)
        for _ in range(3):
            x = torch.randn(B, d_in, generator=gen)
            stats = fused(x.cuda())
            loss = reference_train_step(model64, opt, x.double())
        diffs = {name: float((p.detach().cpu().double() - getattr(model64, name)).norm() / getattr(model64, name).norm())
                 for name, p in model.named_parameters()}
        worst = max(worst, *diffs.values())
        print(f"{d_in}x{d_sae} k{k} B{B}: loss {float(stats.loss):.6f} vs {float(loss):.6f}; rel. diff "
              + ", ".join(f"{n} {d:.1e}" for n, d in diffs.items()), flush=True)
        bf16 = FusedTopKStep(copy.deepcopy(model), lr=1e-3, precision="bf16")
        for _ in range(3):
            bf16(torch.randn(B, d_in, generator=gen).cuda())
        same = all(torch.equal(bf16.params[lp], bf16.params[w].to(torch.bfloat16))
                   for lp, w in (("W_enc_lp", "W_enc_t"), ("W_dec_lp", "W_dec")))
        print(f"  bf16 encoder and decoder copies equal torch's cast of the fp32 rows: {same}", flush=True)
        assert same
    print(f"largest relative difference against float64: {worst:.1e}")
    assert worst < 1e-4


if __name__ == "__main__":
    main()
