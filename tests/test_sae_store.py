"""From a real store (a capture of a small dense model through the real runner): the train
and eval commands end to end, the CE-loss score, and bad input as one line with exit 2."""

from __future__ import annotations

import json
import shutil
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sae.io import load_sae
from sae.model import SparseAutoencoder
from sae.rules import ReLURule
from tests.app_stores import HOOK, dense_store
from tests.cli_process import run_in_process as cli
from tests.cli_process import run_workbench
from tests.phenomena_models import dense_config, handle_for
from workbench.evaluation import ce_loss_score, evaluate_sae, token_windows
from workbench.store.encoding import encode_activations

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return dense_store(tmp_path_factory.mktemp("sae-store"), tokens=3000)


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    """`workbench train` in a real subprocess; returns its output folder."""
    out = tmp_path_factory.mktemp("sae-run") / "topk"
    done = run_workbench(
        "train", "--store", str(store.root), "--hook", HOOK, "--arch", "topk", "--d-sae", "96", "--k", "4",
        "--tokens", "12288", "--batch-size", "256", "--lr", "0.003", "--out", str(out), "--no-progress",
        "--chunk-tokens", "1000",
    )
    assert done.returncode == 0, done.stderr
    assert "saved" in done.stdout and "fvu=" in done.stdout
    return out


def test_train_writes_a_saelens_folder_with_our_record(store, trained):
    assert {"cfg.json", "sae_weights.safetensors", "training.json", "checkpoint.pt"} <= {p.name for p in trained.iterdir()}
    record = json.loads((trained / "training.json").read_text())
    assert record["finished"] and record["step"] == 48 and record["command"][:2] == ["workbench", "train"]
    assert record["step_kind"] == "autograd"  # --step auto on the CPU
    assert record["data"]["hook"] == HOOK and record["config"]["k"] == 4 and len(record["history"]) > 5
    assert record["history"][-1]["fvu"] < record["history"][0]["fvu"]
    cfg = json.loads((trained / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == HOOK and cfg["metadata"]["model_name"] == "planted"
    assert cfg["metadata"]["context_size"] == 48

    from sae_lens import SAE

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = SAE.load_from_disk(str(trained))
    ours, _ = load_sae(trained)
    x = store.activations(HOOK, 0, 1000)
    with torch.no_grad():
        torch.testing.assert_close(ours.feature_acts(x), theirs.encode(x), rtol=1e-4, atol=1e-4)


def test_eval_metrics_and_ce_score(store, trained):
    """On all stored tokens (--split all); the held-out default is tests/test_held_out.py's."""
    handle = handle_for(dense_config())  # the planted model the store was captured from
    result = evaluate_sae(trained, store, ce_sequences=8, handle=handle, split="all")
    ours, _ = load_sae(trained)
    x = store.activations(HOOK)
    with torch.no_grad():
        x_hat = ours.reconstruct(x)
        acts = ours.feature_acts(x)
    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert result["split"] == "all" and result["tokens"] == len(x) == 3000
    assert result["fvu"] == pytest.approx(fvu, rel=1e-4)
    assert result["explained_variance"] == pytest.approx(1 - fvu, rel=1e-4)
    assert result["l0"] == pytest.approx(float((acts > 0).sum(1).float().mean()), rel=1e-6) and result["l0"] <= 4
    assert result["dead_fraction"] == pytest.approx(float(((acts > 0).sum(0) == 0).float().mean()))
    hist = result["log_density_histogram"]
    assert sum(hist["counts"]) + hist["dead"] == 96
    assert result["loss_recovered"] == pytest.approx((result["ce_mean"] - result["ce_sae"]) / (result["ce_mean"] - result["ce_clean"]))
    assert result["loss_recovered_zero"] == pytest.approx((result["ce_zero"] - result["ce_sae"]) / (result["ce_zero"] - result["ce_clean"]))
    assert result["ce_sae"] != pytest.approx(result["ce_clean"], abs=1e-6)  # the splice changed the forward pass


def test_ce_score_is_one_for_a_perfect_reconstruction_and_zero_for_none(store):
    """The splice really replaces the hook: an exact SAE (ReLU(x) - ReLU(-x) = x) leaves the
    loss clean, an SAE reconstructing 0 gives the zero-ablation loss (the mean-ablation
    baseline is tests/test_held_out.py's)."""
    handle = handle_for(dense_config())
    windows = token_windows(store, 6)
    assert windows.shape == (6, 48)
    exact = SparseAutoencoder(32, 64, ReLURule())
    with torch.no_grad():
        eye = torch.eye(32)
        exact.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        exact.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        exact.b_enc.zero_()
        exact.b_dec.zero_()
    mean = store.activations(HOOK).mean(0)
    perfect = ce_loss_score(handle, exact, HOOK, windows, mean)
    assert perfect["ce_sae"] == pytest.approx(perfect["ce_clean"], abs=1e-5)
    assert perfect["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert perfect["loss_recovered_zero"] == pytest.approx(1.0, abs=1e-4)
    with torch.no_grad():
        exact.W_dec.zero_()
    nothing = ce_loss_score(handle, exact, HOOK, windows, mean)
    assert nothing["ce_sae"] == pytest.approx(nothing["ce_zero"], abs=1e-5)
    assert nothing["loss_recovered_zero"] == pytest.approx(0.0, abs=1e-4)
    assert abs(nothing["ce_zero"] - nothing["ce_clean"]) > 1e-3


def test_eval_command_prints_the_table(store, trained, monkeypatch, capsys):
    code, err = cli(monkeypatch, capsys, "eval", str(trained), "--store", str(store.root), "--ce-sequences", "0", "--json")
    assert code == 0, err


def test_hook_not_in_store_is_one_line(store, tmp_path, monkeypatch, capsys):
    code, err = cli(monkeypatch, capsys, "train", "--store", str(store.root), "--hook", "blocks.0.hook_resid_pre",
                    "--k", "4", "--out", str(tmp_path / "x"))  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: hook 'blocks.0.hook_resid_pre' is not in store")
    assert HOOK in err and not (tmp_path / "x").exists()


def test_k_above_d_sae_is_one_line(store, tmp_path, monkeypatch, capsys):
    code, err = cli(monkeypatch, capsys, "train", "--store", str(store.root), "--hook", HOOK, "--d-sae", "16", "--k", "20",
                    "--out", str(tmp_path / "x"))  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "--k 20 must be between 1 and d_sae=16" in err


def test_width_mismatch_on_resume_is_one_line_and_keeps_the_run(store, trained, tmp_path, monkeypatch, capsys):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    before = (copy / "checkpoint.pt").read_bytes()
    code, err = cli(monkeypatch, capsys, "train", "--store", str(store.root), "--hook", HOOK, "--d-sae", "128", "--k", "4",
                    "--tokens", "24576", "--batch-size", "256", "--out", str(copy), "--resume")  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "d_sae=96 (checkpoint) vs 128" in err
    assert (copy / "checkpoint.pt").read_bytes() == before


def test_fused_step_without_cuda_is_one_line(store, tmp_path):
    """The CPU runs the fused step's kernels only with --backend triton (in Triton's interpreter)."""
    done = run_workbench("train", "--store", str(store.root), "--hook", HOOK, "--d-sae", "64", "--k", "4", "--step", "fused",
                         "--out", str(tmp_path / "x"), env={"TRITON_INTERPRET": None})  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: --step fused cannot train this run: ") and "use --device cuda or --step autograd" in done.stderr
    assert not (tmp_path / "x").exists()


def test_fused_step_trains_under_the_triton_interpreter_and_is_recorded(store, tmp_path):
    """The default aux (auxk) included: features die after one batch (--dead-tokens 8)."""
    done = run_workbench("train", "--store", str(store.root), "--hook", HOOK, "--d-sae", "40", "--k", "4", "--dead-tokens", "8",
                         "--tokens", "16", "--batch-size", "8", "--step", "fused", "--backend", "triton", "--out", str(tmp_path / "x"),
                         "--no-progress", env={"TRITON_INTERPRET": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "fused step" in done.stdout
    record = json.loads((tmp_path / "x" / "training.json").read_text())
    assert record["step_kind"] == "fused" and record["finished"] and record["step"] == 2
    assert record["config"]["aux"] == "auxk" and record["history"][-1]["aux"] > 0  # topk's default, with dead features
    assert (tmp_path / "x" / "sae_weights.safetensors").exists()


def test_nan_in_the_store_is_one_line(store, tmp_path, monkeypatch, capsys):
    broken = tmp_path / "store"
    shutil.copytree(store.root, broken)
    meta = store.info()["hooks"][HOOK]
    path = sorted((broken / "capture").glob("batch-*"))[1] / f"act.{HOOK}.parquet"
    acts = store.activations(HOOK, 0, pq.ParquetFile(path).metadata.num_rows)
    acts[7, 3] = float("nan")
    table = pq.read_table(path)
    table = table.set_column(table.schema.get_field_index("act"), "act", pa.chunked_array([encode_activations(acts, meta["dtype"])]))
    pq.write_table(table, path)
    code, err = cli(monkeypatch, capsys, "train", "--store", str(broken), "--hook", HOOK, "--d-sae", "64", "--k", "4",
                    "--tokens", "6144", "--batch-size", "256", "--out", str(tmp_path / "x"), "--no-progress")  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "NaN or Inf" in err


def test_live_model_source_yields_the_stored_activations_shuffled(store):
    """The live source runs the same windows through the model: its first epoch is a
    permutation of the activations the capture stored for those windows."""
    from workbench.training_data import LiveModelSource

    handle = handle_for(dense_config())
    windows = token_windows(store, 4)  # the first 4 windows = stored token_index [0, 192)
    source = LiveModelSource(handle, HOOK, windows, windows_per_chunk=2, buffer_chunks=1, seed=3)
    assert source.d_in == 32
    epoch = torch.cat([b for _, b in zip(range(3), source.batches(64))])
    stored = store.activations(HOOK, 0, 4 * 48)
    assert epoch.shape == stored.shape
    assert not torch.allclose(epoch, stored)  # shuffled
    order = lambda t: t[torch.argsort(t[:, 0])]  # noqa: E731
    torch.testing.assert_close(order(epoch), order(stored), rtol=1e-3, atol=1e-3)
    again = torch.cat([b for _, b in zip(range(3), LiveModelSource(handle, HOOK, windows, 2, 1, seed=3).batches(64))])
    assert torch.equal(epoch, again)
