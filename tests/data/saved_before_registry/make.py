"""Writes the files tests/test_sae_saved_files.py loads: for each training rule, a finished
SAE folder (sae/), a checkpoint halfway through the same run (run/), and expected.safetensors
(the data, a probe batch, the SAE's activations on it and the finished run's weights).

Run with the code that saved the files, from the repository root:
  PYTHONPATH=. python tests/data/saved_before_registry/make.py
The committed files were written before the rule registry existed (rules named by if-chains,
every rule's settings flat in TrainConfig), so loading them checks that change kept the formats.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from sae.config import TrainConfig
from sae.data import TensorSource
from sae.io import load_sae, save_sae
from sae.trainer import Trainer

HERE = Path(__file__).resolve().parent
#: Each rule's run: 8 steps of 32 tokens, 8 -> 24 features; GBA adapts its biases every 2 steps.
RUNS = {
    "topk": dict(k=3),
    "mutual-choice": dict(k=3, theta_decay=0.5),
    "gba": dict(gba_every=2, gba_groups=3, gba_p_max=0.3, gba_gamma=0.05),
}
STEPS, HALF = 8, 4


def config(arch: str) -> TrainConfig:
    return TrainConfig(arch=arch, d_in=8, d_sae=24, tokens=32 * STEPS, batch_size=32, lr=1e-2, seed=2, dead_tokens=64,
                       init_tokens=64, checkpoint_every=1000, **RUNS[arch])


def data() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    directions = torch.randn(20, 8, generator=gen)
    codes = torch.rand(96, 20, generator=gen) * (torch.rand(96, 20, generator=gen) < 0.2)
    return codes @ directions + 0.05 * torch.randn(96, 8, generator=gen)


def main() -> None:
    torch.set_num_threads(1)
    x = data()
    probe = x[:16] * 1.5
    for arch in RUNS:
        folder = HERE / arch
        shutil.rmtree(folder, ignore_errors=True)
        with tempfile.TemporaryDirectory() as tmp:
            whole = Trainer.start(config(arch), TensorSource(x, seed=1), Path(tmp) / "whole", command=["make.py"])
            whole.fit(progress=False)
            save_sae(folder / "sae", whole.model, whole.input_scale)
        half = Trainer.start(config(arch), TensorSource(x, seed=1), folder / "run", command=["make.py"])
        half.fit(until_step=HALF, progress=False)
        model, _ = load_sae(folder / "sae")
        expected = {"data": x, "probe": probe, "acts": model.feature_acts(probe).detach()}
        expected.update({f"final.{k}": v.detach().clone() for k, v in whole.model.state_dict().items()})
        save_file({k: v.contiguous() for k, v in expected.items()}, str(folder / "expected.safetensors"))


if __name__ == "__main__":
    main()
