"""Micro-benchmark (GPU): the per-feature backward + Adam of sae.kernels.triton_feature_adam
against the same work unfused (two per-feature scatters, the parallel-part removal,
torch's fused Adam, the decoder renormalisation, the bf16 cast of the encoder), on pairs
from real top-k selections (x @ W_enc of synthetic batches), at the three training shapes;
with and without chunk_sums (runs of pairs inside one feature summed first), and once more
with one feature on half the rows (a dense feature: one program would walk 2048 pairs).

Also prints the HBM floor: every weight, moment and the bf16 copy read/written once,
(2 * 6 + 0.5) x 4 bytes a weight element (2 * (8 + 8) + 2 with bf16 moments), over the
bandwidth of a device-to-device copy measured here; the pair gathers are left out of it (they hit L2). Each variant's weights
are checked against the unfused result first.

Run: python bench/kernels_feature_adam.py [--configs 0,1,2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton.testing

from sae.kernels.triton_feature_adam import chunk_sums, feature_adam, feature_sums, sort_pairs
from sae.kernels.triton_scatter import feature_scatter, sort_pairs_by_feature
from sae.kernels.triton_topk import row_topk

sys.path.insert(0, str(Path(__file__).parent))
from gpu_train import CONFIGS, synthetic_pool  # noqa: E402


def copy_bandwidth() -> float:
    a = torch.empty(2**28, device="cuda", dtype=torch.uint8)
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=10, rep=50, return_mode="median")
    return 2 * a.numel() / ms * 1e3


def check_against(name: str, params: dict, ref: dict, lr: float = 4e-4) -> None:
    """After one step, each weight moved by lr * g / (|g| + eps): where |g| is near eps the
    step is decided by rounding-level differences in g (summation order), so a few elements
    may differ by a sizeable part of lr. Asserted: no element off by more than 2 lr, and at
    most 1 in 10^5 off by more than lr / 10; printed: how many are off by more than 1e-6."""
    for n in ("W_dec", "W_enc_t", "b_enc"):
        diff = (params[n] - ref[n]).abs()
        off = int((diff > 1e-6).sum())
        assert float(diff.max()) <= 2 * lr and int((diff > lr / 10).sum()) <= diff.numel() // 10**5 + 1, (name, n)
        if off:
            print(f"  ({name}: {n}: {off} of {diff.numel()} elements off by more than 1e-6, max {float(diff.max()):.1e})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="0,1,2")
    args = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()}")
    bandwidth = copy_bandwidth()
    print(f"device-to-device copy: {bandwidth / 1e12:.2f} TB/s")
    print("| shape | variant | ms | % of HBM floor |")
    print("|---|---|---|---|")
    for (d_in, F, k, B), dense in ((CONFIGS[int(c)], dense) for c in args.configs.split(",") for dense in (False, True)):
        gen = torch.Generator(device="cuda").manual_seed(F)
        x = synthetic_pool(d_in, k, B, 1, seed=0)[0]
        W_dec = torch.randn(F, d_in, device="cuda", generator=gen)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        values, indices, _ = row_topk((x @ W_dec.t()).to(torch.bfloat16), k)
        if dense:  # a feature on half the rows, as dense features of real SAEs fire
            indices[: B // 2, 0] = 7
        counts = torch.bincount(indices.reshape(-1), minlength=F)
        grad_val = torch.randn(B, k, device="cuda", generator=gen) * (values > 0)
        grad_out = torch.randn(B, d_in, device="cuda", generator=gen) * 1e-3
        xc = x.to(torch.bfloat16)
        lr, step = torch.tensor([4e-4], device="cuda"), torch.ones(1, device="cuda")
        floor_ms = (2 * 6 + 0.5) * 4 * F * d_in / bandwidth * 1e3
        floor_bf16_ms = (2 * (8 + 8) + 2) * F * d_in / bandwidth * 1e3
        label = f"{d_in}x{F} k{k} B{B}" + (", one feature on half the rows" if dense else "")
        print(f"| {label} | pairs per feature: max {int(counts.max())}, mean {counts.float().mean():.1f} | | |")

        def fresh(moments_dtype=torch.float32):
            params = {"W_dec": W_dec.clone(), "W_enc_t": W_dec.clone(), "b_enc": torch.zeros(F, device="cuda")}
            params["W_enc_lp"] = params["W_enc_t"].to(torch.bfloat16)
            moments = {n: tuple(torch.zeros_like(t, dtype=moments_dtype if t.dim() == 2 else torch.float32) for _ in range(2))
                       for n, t in params.items() if n != "W_enc_lp"}
            return params, moments

        def unfused(params, moments, opt):
            order, offsets = sort_pairs_by_feature(indices, F)
            d_dec, d_enc, d_b = torch.empty_like(W_dec), torch.empty_like(W_dec), torch.empty(F, device="cuda")
            feature_scatter(order, offsets, k, values, grad_out, d_dec)
            feature_scatter(order, offsets, k, grad_val, xc, d_enc, d_b)
            d_dec -= (d_dec * params["W_dec"]).sum(1, keepdim=True) * params["W_dec"]
            for name, g in (("W_dec", d_dec), ("W_enc_t", d_enc), ("b_enc", d_b)):
                params[name].grad = g
            opt.step()
            params["W_dec"].div_(params["W_dec"].norm(dim=1, keepdim=True).clamp(min=1e-8))
            params["W_enc_lp"].copy_(params["W_enc_t"])

        def fused(params, moments, chunk=0, **kw):
            pairs = sort_pairs(indices, values, grad_val, F)
            chunks = chunk_sums(pairs, grad_out, xc, chunk) if chunk else None
            feature_adam(pairs, grad_out, xc, params, moments, feature_sums(pairs, chunks), lr, step, chunks=chunks, **kw)

        ref, _ = fresh()
        ref_list = [ref[n] for n in ("W_dec", "W_enc_t", "b_enc")]
        opt = torch.optim.Adam(ref_list, lr=4e-4, fused=True)
        with torch.no_grad():
            unfused(ref, None, opt)
        bf16 = torch.bfloat16
        variants = {"unfused: 2 scatters + torch fused Adam + renorm + cast": None,
                    "fused, fp32 moments, 4 warps, BLOCK_P 4": dict(num_warps=4, block_p=4)}
        for warps in (2, 4, 8):
            for block_p in (2, 4, 8):
                variants[f"fused, bf16 moments, {warps} warps, BLOCK_P {block_p}"] = dict(num_warps=warps, block_p=block_p, moments_dtype=bf16)
        for chunk in (32, 64, 128):
            variants[f"fused, bf16 moments, 4 warps, BLOCK_P 4, pair chunks of {chunk}"] = dict(
                num_warps=4, block_p=4, moments_dtype=bf16, chunk=chunk)
        for name, kw in variants.items():
            moments_dtype = (kw or {}).pop("moments_dtype", torch.float32)
            params, moments = fresh(moments_dtype)
            floor = floor_ms if moments_dtype == torch.float32 else floor_bf16_ms
            if kw is None:
                params_list = [params[n] for n in ("W_dec", "W_enc_t", "b_enc")]
                opt = torch.optim.Adam(params_list, lr=4e-4, fused=True)
                run = lambda: unfused(params, moments, opt)  # noqa: E731
            else:
                run = lambda kw=kw: fused(params, moments, **kw)  # noqa: E731
                with torch.no_grad():
                    run()
                check_against(name, params, ref)
            with torch.no_grad():
                ms = triton.testing.do_bench(run, warmup=5, rep=40, return_mode="median")
            print(f"| {label} | {name} | {ms:.3f} | {floor / ms:.0%} |", flush=True)
        print(f"| {label} | HBM floor | {floor_ms:.3f} | |", flush=True)
        print(f"| {label} | HBM floor, bf16 moments | {floor_bf16_ms:.3f} | |", flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
