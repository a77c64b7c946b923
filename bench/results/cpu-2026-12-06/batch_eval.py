"""Held-out FVU of saved SAEs under three selections on the same weights: the saved rule
(Mutual Choice's calibrated threshold; TopK's per-token top k), the batch's top k*B over
batches of 1024 (Mutual Choice's training rule) and each token's top k.

    python batch_eval.py STORE START STOP K SAE_FOLDER...
"""

import sys

import torch

from sae.io import load_sae
from workbench.evaluation import finite_activations
from workbench.store.reader import Store

HOOK = "blocks.2.hook_resid_post"


def batch_top(z: torch.Tensor, k: int) -> torch.Tensor:
    """ReLU(z) [B, d_sae] at the batch's k*B largest entries, 0 elsewhere."""
    values, flat = z.relu().flatten().topk(k * len(z))
    return torch.zeros(z.numel()).scatter_(0, flat, values).view_as(z)


def main() -> None:
    store_path, start, stop, k, *folders = sys.argv[1:]
    start, stop, k = int(start), int(stop), int(k)
    x = torch.cat([torch.as_tensor(c) for c in finite_activations(Store.open(store_path), HOOK, 8192, start, stop)]).float()
    total = (x - x.mean(0)).pow(2).sum()

    def fvu(dense: torch.Tensor, sae: torch.nn.Module) -> float:
        return ((x - (dense @ sae.W_dec + sae.b_dec)).pow(2).sum() / total).item()

    for folder in folders:
        sae, _ = load_sae(folder)
        sae.eval()
        with torch.no_grad():
            z = sae.pre_acts(x)
            saved = sae.feature_acts(x)
            batch = torch.cat([batch_top(zb, k) for zb in z.split(1024)])
            values, indices = z.relu().topk(k, dim=1)
            per_token = torch.zeros_like(z).scatter_(1, indices, values)
            print(f"{folder}: saved rule FVU {fvu(saved, sae):.4f} at L0 {(saved > 0).sum(1).float().mean():.2f}; "
                  f"batch top-{k}x1024 {fvu(batch, sae):.4f}; per-token top-{k} {fvu(per_token, sae):.4f}")


if __name__ == "__main__":
    main()
