"""Data-parallel training: two real processes under torchrun (gloo on CPU) end with
identical weights, equal to one process training on the same global batches."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sae.config import TrainConfig
from sae.data import TensorSource
from sae.errors import SAEError
from sae.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]

CONFIG = dict(arch="topk", d_in=12, d_sae=48, k=4, tokens=64 * 12, batch_size=64, aux="none", init_tokens=256, seed=3)

WORKER = """
import os, sys, torch
from sae.config import TrainConfig
from sae.data import TensorSource
from sae.distributed import train_data_parallel
data = torch.load(sys.argv[1])
config = TrainConfig(**eval(sys.argv[2]))
model = train_data_parallel(config, TensorSource(data, seed=1))
torch.save(model.state_dict(), os.path.join(sys.argv[3], f"rank{os.environ['RANK']}.pt"))
"""


def make_data() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(30, CONFIG["d_in"], generator=gen)
    codes = torch.rand(2000, 30, generator=gen) * (torch.rand(2000, 30, generator=gen) < 0.1)
    return codes @ V + 0.01 * torch.randn(2000, CONFIG["d_in"], generator=gen)


def test_two_processes_match_one(tmp_path):
    data = make_data()
    torch.save(data, tmp_path / "data.pt")
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "worker.py"), str(tmp_path / "data.pt"), repr(CONFIG), str(tmp_path)]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")

    single = Trainer.start(TrainConfig(**CONFIG), TensorSource(data, seed=1)).fit(progress=False).state_dict()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(rank0[name], rank1[name]), f"ranks disagree on {name}"
        assert torch.allclose(rank0[name], single[name], rtol=1e-4, atol=1e-5), f"{name} differs from the single-process run"
    start = Trainer.start(TrainConfig(**CONFIG), TensorSource(data, seed=1)).model.state_dict()
    assert not torch.allclose(start["W_dec"], single["W_dec"], atol=1e-3)  # training moved the weights


def test_refuses_without_torchrun(monkeypatch):
    from sae.distributed import init_process_group

    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SAEError, match="torchrun"):
        init_process_group()
