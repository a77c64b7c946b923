"""`workbench train` under torchrun: two real processes (gloo on CPU) train one run, rank 0
writes it, and the saved SAE equals the one `workbench train` writes in one process, with
the batch split (the fused step) or the features split (--shard-latents)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from sae.io import load_sae
from tests.cli_process import REPO, run_workbench

HOOK = "blocks.0.hook_resid_post"
BASE = ("train", "--hook", HOOK, "--d-sae", "24", "--k", "3", "--tokens", "96", "--batch-size", "32", "--lr", "1e-2",
        "--aux", "none", "--held-out", "0", "--no-progress")
TRAIN = (*BASE, "--step", "fused", "--backend", "triton")
ENV = {"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("torchrun") / "store"
    done = run_workbench("capture", "--model", "tiny-relu", "--hooks", HOOK, "--tokens", "256", "--ctx", "32",
                         "--batch-size", "4", "--store", str(folder))
    assert done.returncode == 0, done.stderr
    return folder


def torchrun(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "workbench.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, **ENV})


def test_two_ranks_write_the_run_one_process_would(store, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    done = torchrun(*TRAIN, "--store", str(store), "--out", str(two))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("saved ") == 1, done.stdout  # rank 0 alone reports
    assert json.loads((two / "training.json").read_text())["step_kind"] == "fused-data-parallel"
    single = run_workbench(*TRAIN, "--store", str(store), "--out", str(one), env=ENV)
    assert single.returncode == 0, single.stderr
    assert json.loads((one / "training.json").read_text())["step_kind"] == "fused"
    ranks, _ = load_sae(two)
    alone, _ = load_sae(one)
    for name, value in alone.state_dict().items():
        assert torch.allclose(ranks.state_dict()[name], value, rtol=1e-4, atol=1e-5), name


def test_an_uneven_batch_is_one_clear_error(store, tmp_path):
    args = [a if a != "32" else "33" for a in TRAIN]
    done = torchrun(*args, "--store", str(store), "--out", str(tmp_path / "run"))
    assert done.returncode != 0
    assert "must divide evenly over 2 processes" in done.stderr


def test_shard_latents_writes_the_unsharded_sae_one_process_would(store, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    done = torchrun(*BASE, "--shard-latents", "--store", str(store), "--out", str(two))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((two / "training.json").read_text())["step_kind"] == "shard-latents"
    single = run_workbench(*BASE, "--step", "autograd", "--store", str(store), "--out", str(one))
    assert single.returncode == 0, single.stderr
    (ranks, cfg_ranks), (alone, cfg_alone) = load_sae(two), load_sae(one)
    assert cfg_ranks == cfg_alone
    for name, value in alone.state_dict().items():
        assert torch.allclose(ranks.state_dict()[name], value, rtol=1e-4, atol=1e-5), name


def test_shard_latents_outside_torchrun_is_one_clear_error(store, tmp_path):
    done = run_workbench(*BASE, "--shard-latents", "--store", str(store), "--out", str(tmp_path / "run"))
    assert done.returncode == 2
    assert "error: --shard-latents splits the features over torchrun's processes" in done.stderr
    assert not (tmp_path / "run").exists()
