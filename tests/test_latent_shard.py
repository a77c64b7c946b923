"""Latent sharding (sae.latent_shard): two real processes (torchrun, gloo on CPU) each train
half of a TopK SAE's features and together train the one-process SAE: the same losses
step by step, and a saved SAE and checkpoint in the unsharded layout with the same weights
and Adam moments, from which a sharded run resumes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from sae.config import TrainConfig
from sae.data import TensorSource
from sae.io import load_sae
from sae.trainer import CHECKPOINT_FILE, RECORD_FILE, Trainer

REPO = Path(__file__).resolve().parents[1]
CONFIG = dict(arch="topk", d_in=12, d_sae=48, k=4, tokens=64 * 10, batch_size=64, aux="none", init_tokens=256, seed=3,
              lr=1e-2, log_every=1, checkpoint_every=5)
TOLERANCE = dict(rtol=1e-4, atol=1e-5)

WORKER = """
import sys, torch
from sae.config import TrainConfig
from sae.data import TensorSource
from sae.distributed import process_group
from sae.trainer import Trainer
config, source = TrainConfig(**eval(sys.argv[2])), TensorSource(torch.load(sys.argv[1]), seed=1)
with process_group("cpu") as (rank, device):
    if sys.argv[4] == "resume":
        trainer = Trainer.resume(sys.argv[3], source, config, step="shard-latents")
    else:
        trainer = Trainer.start(config, source, sys.argv[3], step="shard-latents")
    trainer.writer = rank == 0
    trainer.fit(progress=False)
"""


def make_data() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(30, CONFIG["d_in"], generator=gen)
    codes = torch.rand(2000, 30, generator=gen) * (torch.rand(2000, 30, generator=gen) < 0.1)
    return codes @ V + 0.01 * torch.randn(2000, CONFIG["d_in"], generator=gen)


def run_ranks(tmp_path: Path, data: torch.Tensor, config: dict, out: Path, how: str = "start") -> None:
    torch.save(data, tmp_path / "data.pt")
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "worker.py"), str(tmp_path / "data.pt"), repr(config), str(out), how]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]


def assert_same_sae(a_folder: Path, b_folder: Path) -> None:
    (a, cfg_a), (b, cfg_b) = load_sae(a_folder), load_sae(b_folder)
    assert cfg_a == cfg_b
    for name, value in b.state_dict().items():
        assert a.state_dict()[name].shape == value.shape
        assert torch.allclose(a.state_dict()[name], value, **TOLERANCE), name


def test_two_shards_train_the_one_process_sae(tmp_path):
    data = make_data()
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    run_ranks(tmp_path, data, CONFIG, sharded)
    Trainer.start(TrainConfig(**CONFIG), TensorSource(data, seed=1), single, step="autograd").fit(progress=False)

    runs = [json.loads((folder / RECORD_FILE).read_text()) for folder in (sharded, single)]
    assert runs[0]["step_kind"] == "shard-latents"
    losses = [[row["fvu"] for row in run["history"]] for run in runs]
    assert len(losses[0]) == 10 and losses[0][-1] < losses[0][0]  # it trained
    assert torch.allclose(torch.tensor(losses[0]), torch.tensor(losses[1]), **TOLERANCE)

    assert_same_sae(sharded, single)
    moments = [torch.load(folder / CHECKPOINT_FILE)["optimizer"]["state"] for folder in (sharded, single)]
    for i, entry in moments[1].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(moments[0][i][key], entry[key], rtol=1e-3, atol=1e-7), (i, key)
        assert float(moments[0][i]["step"]) == float(entry["step"]) == 10


def test_a_sharded_run_resumes_from_its_checkpoint_as_one_process_trains(tmp_path):
    """5 steps, then resumed to 10 (constant lr, so the schedule is the 10-step run's), equals
    one process's 10 steps: the unsharded checkpoint slices back into the shards."""
    data, constant = make_data(), dict(decay_fraction=0.0, warmup_steps=0)
    first, whole = {**CONFIG, **constant, "tokens": 64 * 5}, {**CONFIG, **constant}
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    run_ranks(tmp_path, data, first, sharded)
    assert torch.load(sharded / CHECKPOINT_FILE)["step"] == 5
    run_ranks(tmp_path, data, whole, sharded, "resume")
    assert torch.load(sharded / CHECKPOINT_FILE)["step"] == 10
    Trainer.start(TrainConfig(**whole), TensorSource(data, seed=1), single, step="autograd").fit(progress=False)
    assert_same_sae(sharded, single)
