"""The fused TopK step over two real processes (torchrun, gloo on CPU, Triton under
TRITON_INTERPRET=1): the ranks end with bit-identical weights, equal to one process's
fused step on the same global batches (with and without AuxK, whose dead features appear
after one batch here), and the Trainer under torchrun picks it."""

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from sae.config import TrainConfig
from sae.data import TensorSource
from sae.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
CONFIG = dict(arch="topk", d_in=12, d_sae=20, k=3, tokens=8 * STEPS, batch_size=8, aux="none", init_tokens=64, seed=3,
              lr=1e-2, warmup_steps=1, decay_fraction=0.5)
AUXK = dict(aux="auxk", dead_tokens=8, k_aux=4, aux_alpha=0.5)

WORKER = """
import os, sys, torch
from sae.config import TrainConfig
from sae.data import TensorSource
from sae.distributed import train_data_parallel
import sae.trainer
config = TrainConfig(**eval(sys.argv[2]))
kinds = []
start = sae.trainer.Trainer.start
def recording(*args, **kw):
    trainer = start(*args, **kw)
    kinds.append(trainer.step_kind)
    return trainer
sae.trainer.Trainer.start = recording
model = train_data_parallel(config, TensorSource(torch.load(sys.argv[1]), seed=1), step=sys.argv[4], backend="triton")
torch.save({"kind": kinds[0], **model.state_dict()}, os.path.join(sys.argv[3], f"rank{os.environ['RANK']}.pt"))
"""


def make_data() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(30, CONFIG["d_in"], generator=gen)
    codes = torch.rand(400, 30, generator=gen) * (torch.rand(400, 30, generator=gen) < 0.15)
    return codes @ V + 0.05 * torch.randn(400, CONFIG["d_in"], generator=gen)


def run_ranks(tmp_path: Path, data: torch.Tensor, step: str, config: dict) -> tuple[dict, dict]:
    torch.save(data, tmp_path / "data.pt")
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "worker.py"), str(tmp_path / "data.pt"), repr(config), str(tmp_path), step]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")


@pytest.mark.parametrize("aux", [{}, AUXK], ids=["none", "auxk"])
def test_two_ranks_agree_bitwise_and_match_one_process(tmp_path, aux):
    data, config = make_data(), {**CONFIG, **aux}
    rank0, rank1 = run_ranks(tmp_path, data, "fused", config)
    assert rank0.pop("kind") == rank1.pop("kind") == "fused-data-parallel"
    single = Trainer.start(TrainConfig(**config), TensorSource(data, seed=1), step="fused", backend="triton")
    assert single.step_kind == "fused"
    start = {k: v.clone() for k, v in single.model.state_dict().items()}
    trained = single.fit(progress=False).state_dict()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(rank0[name], rank1[name]), f"ranks disagree on {name}"
        assert torch.allclose(rank0[name], trained[name], rtol=1e-5, atol=3e-6), f"{name} differs from one process"
        assert not torch.allclose(start[name], trained[name], atol=1e-4), f"training did not move {name}"


def test_auto_on_the_cpu_under_torchrun_is_the_autograd_data_parallel_step(tmp_path):
    rank0, rank1 = run_ranks(tmp_path, make_data(), "auto", CONFIG)
    assert rank0["kind"] == rank1["kind"] == "data-parallel"
