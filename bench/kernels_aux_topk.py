"""Micro-benchmark (GPU): the fused step's aux selection, each row's k_aux = 384 largest of
the aux features' columns (bf16, -inf padding columns as sae.fused_step.aux_columns leaves
them), torch.topk against the Triton guess-and-verify select (sae.kernels.triton_topk),
both through sae.kernels.topk_rows; the kept values are checked equal first.

Run: python bench/kernels_aux_topk.py
"""

import torch
import triton.testing

from sae.kernels import topk_rows


def main() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}")
    for B, N, k in [(4096, 12288, 384), (4096, 6144, 384), (4096, 18432, 384)]:
        scale = 0.25 + 3 * torch.rand(B, 1, device="cuda", generator=gen)  # rows' norms vary per token
        z = (torch.randn(B, N, device="cuda", generator=gen) * scale).to(torch.bfloat16)
        z[:, -40:] = -torch.inf
        vt, _ = topk_rows(z, k, backend="torch")
        vr, _ = topk_rows(z, k, backend="triton")
        same = torch.equal(vt.sort(dim=1).values, vr.sort(dim=1).values)
        t_torch = triton.testing.do_bench(lambda: topk_rows(z, k, backend="torch"))
        t_triton = triton.testing.do_bench(lambda: topk_rows(z, k, backend="triton"))
        print(f"{B}x{N} k{k}: torch.topk {t_torch:.3f} ms, triton row_topk {t_triton:.3f} ms, same values {same}", flush=True)


if __name__ == "__main__":
    main()
