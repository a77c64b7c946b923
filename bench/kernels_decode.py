"""Micro-benchmark (GPU): the sparse decoder forward+backward against torch.embedding_bag
and the dense product, as a fraction of the memory-bandwidth floor.

Floor bytes for one forward+backward (fp32 weights): read W_dec for the gather (every row
is touched once B*k >> d_sae), read it again for dvalues, write dW_dec, and read/write the
[B, d_in] output and its gradient: (3 * d_sae * d_in + 2 * B * d_in) * 4 bytes. The
bandwidth is measured here with a device-to-device copy. Each variant is checked against a
float64 reference before it is timed (NaN-poisoned outputs, fresh random inputs).

Run: python bench/kernels_decode.py   (prints a markdown table; --json PATH writes rows)
"""

from __future__ import annotations

import argparse
import json

import torch
import triton.testing

from sae.kernels import sparse_decode

CONFIGS = [(4096, 32, 24576, 768), (4096, 64, 65536, 2048), (8192, 64, 131072, 4096)]


def copy_bandwidth() -> float:
    """Bytes/s of a 2 GiB device-to-device copy (read + write counted)."""
    src = torch.randn(256 * 2**20, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3)


def make_inputs(B, k, d_sae, d_in, gen):
    idx = torch.randint(0, d_sae, (B, k), device="cuda", generator=gen)
    vals = torch.rand(B, k, device="cuda", generator=gen)
    W = torch.randn(d_sae, d_in, device="cuda", generator=gen) / d_in**0.5
    g = torch.randn(B, d_in, device="cuda", generator=gen)
    return idx, vals, W, g


def ours(idx, vals, W, g):
    v, Wp = vals.detach().requires_grad_(), W.detach().requires_grad_()
    sparse_decode(idx, v, Wp).backward(g)
    return v.grad, Wp.grad


def embedding_bag(idx, vals, W, g):
    v, Wp = vals.detach().requires_grad_(), W.detach().requires_grad_()
    torch.nn.functional.embedding_bag(idx, Wp, per_sample_weights=v, mode="sum").backward(g)
    return v.grad, Wp.grad


def dense(idx, vals, W, g):
    v, Wp = vals.detach().requires_grad_(), W.detach().requires_grad_()
    A = torch.zeros(idx.shape[0], W.shape[0], device="cuda").scatter_add(1, idx, v)
    (A @ Wp).backward(g)
    return v.grad, Wp.grad


def check(fn, B, k, d_sae, d_in, gen) -> float:
    """Worst relative error of (dvalues, dW) against float64 on smaller fresh inputs."""
    idx, vals, W, g = make_inputs(min(B, 512), k, d_sae, d_in, gen)
    dv, dW = fn(idx, vals, W, g)
    A64 = torch.zeros(idx.shape[0], d_sae, device="cuda", dtype=torch.float64).scatter_add(1, idx, vals.double())
    ref_dv = (g.double() @ W.double().t()).gather(1, idx)
    ref_dW = A64.t() @ g.double()
    errs = [((a.double() - r).norm() / r.norm()).item() for a, r in ((dv, ref_dv), (dW, ref_dW))]
    assert not any(e != e for e in errs), "NaN in output"
    return max(errs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    bw = copy_bandwidth()
    rows = []
    for B, k, d_sae, d_in in CONFIGS:
        floor_s = (3 * d_sae * d_in + 2 * B * d_in) * 4 / bw
        inputs = [make_inputs(B, k, d_sae, d_in, gen) for _ in range(2)]
        for name, fn in (("ours (triton)", ours), ("embedding_bag", embedding_bag), ("dense", dense)):
            err = check(fn, B, k, d_sae, d_in, gen)
            it = iter(range(10**9))
            ms = triton.testing.do_bench(lambda: fn(*inputs[next(it) % 2]), warmup=25, rep=100, return_mode="median")
            rows.append(dict(config=f"{d_in}x{d_sae} k{k} B{B}", variant=name, ms=ms, floor_ms=floor_s * 1e3,
                             frac_floor=floor_s * 1e3 / ms, rel_err=err))
            torch.cuda.empty_cache()
    print(f"copy bandwidth: {bw / 1e12:.2f} TB/s ({torch.cuda.get_device_name()})")
    print("| config | variant | fwd+bwd ms | floor ms | fraction of floor | rel err vs fp64 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['variant']} | {r['ms']:.3f} | {r['floor_ms']:.3f} | {r['frac_floor']:.1%} | {r['rel_err']:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(bandwidth=bw, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
