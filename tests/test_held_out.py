"""The held-out split on a real store of the zoo's tiny-relu: `workbench train` records it and
never reads it, `workbench eval` scores it (and says so), loss recovered against mean ablation
is 0 for an SAE that answers the mean and 1 for an exact one, and runs without a usable split
evaluate all stored tokens with a note."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from sae.model import SparseAutoencoder
from sae.rules import ReLURule
from tests.cli_process import run_in_process as cli
from tests.cli_process import run_workbench
from tests.phenomena_models import capture
from workbench.errors import WorkbenchError
from workbench.evaluation import evaluate_sae, token_windows
from workbench.held_out import HeldOutSplit, run_record, store_fingerprint
from workbench.training_data import LiveModelSource, StoreSource

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HOOK = "blocks.1.hook_resid_post"
#: 2000 tokens of ctx 48: 42 windows, the last one partial (32 tokens); 5% holds out the last 3.
TOKENS, CTX, HELD_START = 2000, 48, 39 * 48


@pytest.fixture(scope="module")
def store(tiny_relu, tmp_path_factory):
    return capture(tiny_relu, tmp_path_factory.mktemp("held-out"), [], tokens=TOKENS, ctx=CTX, batch_size=8, hooks=[HOOK])


def train(store, out, *extra: str):
    done = run_workbench("train", "--store", str(store.root), "--hook", HOOK, "--d-sae", "384", "--k", "8", "--tokens", "2048",
                         "--batch-size", "256", "--chunk-tokens", "500", "--out", str(out), "--no-progress", *extra)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    """`workbench train` with the default split, in a real subprocess; its output folder."""
    out = tmp_path_factory.mktemp("run") / "topk"
    done = train(store, out)
    assert f"the last 3 windows, token_index [{HELD_START:,}, {TOKENS:,})" in done.stdout
    return out


def counts(rows: torch.Tensor) -> Counter:
    """Each distinct row (its bytes) and how often it occurs."""
    return Counter(r.tobytes() for r in rows.numpy())


def split_of(folder) -> HeldOutSplit:
    return HeldOutSplit.from_dict(run_record(folder)["data"]["held_out"])


def exact_sae(d: int) -> SparseAutoencoder:
    """ReLU(x) - ReLU(-x) = x: reconstructs every input exactly."""
    sae = SparseAutoencoder(d, 2 * d, ReLURule())
    with torch.no_grad():
        eye = torch.eye(d)
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_training_json_records_the_split(store, trained):
    data = run_record(trained)["data"]
    split = split_of(trained)
    assert (split.start, split.stop, split.windows, split.fraction) == (HELD_START, TOKENS, 3, 0.05)
    assert split.store_fingerprint == store_fingerprint(store) and split.store_tokens == TOKENS
    held = store.tokens(split.start, split.stop)
    assert held["pos"].iloc[0] == 0 and held["seq"].iloc[0] == 39  # whole windows, the last 3
    assert split.token_ids_sha256 == hashlib.sha256(held["token_id"].to_numpy(dtype=np.int64).tobytes()).hexdigest()
    assert data["train_tokens"] == [0, HELD_START] and data["store_tokens"] == HELD_START
    assert "last ceil(0.05 * windows)" in data["held_out"]["rule"]


@pytest.mark.parametrize("resident", [True, False])
def test_the_trainer_reads_no_held_out_row(store, trained, resident):
    """Two epochs of the training stream, resident and streamed: one epoch is the training
    range's rows (as a multiset), and no row of either is a held-out row (the rows at a
    window's first position, the same in every window, are left out of the comparison)."""
    split = split_of(trained)
    source = StoreSource(store, HOOK, chunk_tokens=500, buffer_chunks=2, held_out=split, resident=resident)
    assert source.loader.span == (0, HELD_START)
    rows = torch.cat([b for _, b in zip(range(2 * HELD_START // 48), source.batches(48))]).float()
    training = counts(store.activations(HOOK, 0, HELD_START))
    held_only = set(counts(store.activations(HOOK, HELD_START, TOKENS))) - set(training)
    assert len(held_only) > 0.9 * (TOKENS - HELD_START)
    assert counts(rows[:HELD_START]) == training
    assert not set(counts(rows)) & held_only


def test_live_model_training_records_that_no_split_exists(store, tiny_relu):
    described = LiveModelSource(tiny_relu, HOOK, token_windows(store, 2)).describe()
    assert described["held_out"] is None and "live-model training reads no store" in described["held_out_note"]


def test_eval_scores_the_held_out_tokens(store, trained, tiny_relu):
    result = evaluate_sae(trained, store, ce_sequences=8, handle=tiny_relu)
    assert result["split"] == "held-out" and result["split_tokens"] == [HELD_START, TOKENS] and result["split_note"] is None
    assert result["tokens"] == TOKENS - HELD_START
    everything = evaluate_sae(trained, store, ce_sequences=0, split="all")
    assert everything["tokens"] == TOKENS and everything["fvu"] != pytest.approx(result["fvu"], rel=1e-4)
    from sae.io import load_sae

    sae, _ = load_sae(trained)
    x = store.activations(HOOK, HELD_START, TOKENS)
    with torch.no_grad():
        fvu = float((x - sae.reconstruct(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert result["fvu"] == pytest.approx(fvu, rel=1e-4)
    assert result["ce_sequences"] == 2  # the held-out windows 39 and 40; window 41 is partial
    assert result["ce_zero"] > result["ce_mean"] > result["ce_clean"]


def test_loss_recovered_is_zero_for_the_mean_and_one_for_an_exact_sae(store, trained, tiny_relu):
    """An SAE whose output is always the held-out mean scores 0 against mean ablation, though
    zero ablation credits it with much of the loss; an exact SAE scores 1 against both."""
    record = run_record(trained)
    mean_sae = exact_sae(192)
    with torch.no_grad():
        mean_sae.W_dec.zero_()
        mean_sae.b_dec.copy_(store.activations(HOOK, HELD_START, TOKENS).mean(0))
    mean = evaluate_sae(mean_sae, store, hook=HOOK, ce_sequences=2, handle=tiny_relu, record=record)
    assert mean["split"] == "held-out"
    assert mean["loss_recovered"] == pytest.approx(0.0, abs=1e-3)
    assert mean["loss_recovered_zero"] > 0.3
    exact = evaluate_sae(exact_sae(192), store, hook=HOOK, ce_sequences=2, handle=tiny_relu, record=record)
    assert exact["fvu"] == pytest.approx(0.0, abs=1e-6)
    assert exact["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert exact["loss_recovered_zero"] == pytest.approx(1.0, abs=1e-4)


def test_eval_command_says_it_scores_the_held_out_tokens(store, trained):
    done = run_workbench("eval", str(trained), "--store", str(store.root), "--ce-sequences", "0", env={"COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    assert f"held-out tokens, token_index [{HELD_START:,}, {TOKENS:,}) ({TOKENS - HELD_START} tokens)" in done.stdout
    assert "note:" not in done.stdout


def without_split(trained, folder):
    """A copy of the run as a run from before held-out splits: training.json without them."""
    shutil.copytree(trained, folder)
    record = json.loads((folder / "training.json").read_text())
    del record["data"]["held_out"]
    (folder / "training.json").write_text(json.dumps(record))
    return folder


def test_an_old_run_without_a_split_evaluates_all_tokens_with_a_note(store, trained, tmp_path):
    old = without_split(trained, tmp_path / "old")
    done = run_workbench("eval", str(old), "--store", str(store.root), "--ce-sequences", "0", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["split"] == "all" and result["tokens"] == TOKENS and result["split_tokens"] == [0, TOKENS]
    assert "records no held-out split (the run predates them)" in result["split_note"]
    table = run_workbench("eval", str(old), "--store", str(store.root), "--ce-sequences", "0")
    assert table.stdout.startswith("note: no held-out split: its training.json records no held-out split")
    assert f"scoring all {TOKENS:,} stored tokens" in table.stdout


def test_a_folder_without_training_json_evaluates_all_tokens_with_a_note(store, trained, tmp_path):
    folder = tmp_path / "saelens"
    folder.mkdir()
    for name in ("cfg.json", "sae_weights.safetensors"):
        shutil.copy(trained / name, folder / name)
    result = evaluate_sae(folder, store, ce_sequences=0)
    assert result["split"] == "all" and "no training record (training.json)" in result["split_note"]


def test_an_empty_split_evaluates_all_tokens_with_a_note(store, tmp_path):
    train(store, tmp_path / "none", "--held-out", "0")
    record = run_record(tmp_path / "none")
    assert record["data"]["held_out"]["windows"] == 0 and record["data"]["train_tokens"] == [0, TOKENS]
    result = evaluate_sae(tmp_path / "none", store, ce_sequences=0)
    assert result["split"] == "all" and result["tokens"] == TOKENS
    assert result["split_note"].startswith("the recorded held-out split is empty (--held-out 0 of 2,000 tokens)")


def test_another_store_or_changed_tokens(store, trained, tmp_path):
    """A record from another capture scores all of this store's tokens; one whose held-out
    token ids differ from the store's is refused (the store changed under the run)."""
    record = run_record(trained)
    sae = exact_sae(192)
    other = json.loads(json.dumps(record))
    other["data"]["held_out"]["store_fingerprint"] = "0" * 16
    result = evaluate_sae(sae, store, hook=HOOK, ce_sequences=0, record=other)
    assert result["split"] == "all" and "is not the store the SAE trained on" in result["split_note"]
    changed = json.loads(json.dumps(record))
    changed["data"]["held_out"]["token_ids_sha256"] = "0" * 64
    with pytest.raises(WorkbenchError, match=r"are not the held-out tokens recorded in training.json"):
        evaluate_sae(sae, store, hook=HOOK, ce_sequences=0, record=changed)


def test_resume_keeps_the_split_and_refuses_another(store, trained, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    args = ("train", "--store", str(store.root), "--hook", HOOK, "--d-sae", "384", "--k", "8", "--tokens", "2560",
            "--batch-size", "256", "--chunk-tokens", "500", "--out", str(run), "--no-progress", "--resume")  # fmt: skip
    code, err = cli(monkeypatch, capsys, *args, "--held-out", "0.1")
    assert code == 2 and err.count("\n") == 1 and "the run holds out 0.05" in err
    code, err = cli(monkeypatch, capsys, *args)
    assert code == 0, err
    assert run_record(run)["step"] == 10 and split_of(run) == split_of(trained)


def test_a_malformed_split_is_one_line(store, trained, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(trained, bad)
    record = json.loads((bad / "training.json").read_text())
    record["data"]["held_out"]["start"] = "1872; DROP TABLE tokens"
    (bad / "training.json").write_text(json.dumps(record))
    code, err = cli(monkeypatch, capsys, "eval", str(bad), "--store", str(store.root), "--ce-sequences", "0")
    assert code == 2 and err.count("\n") == 1 and "held-out split in training.json is malformed (start:" in err
    (bad / "training.json").write_text("{not json")
    code, err = cli(monkeypatch, capsys, "eval", str(bad), "--store", str(store.root), "--ce-sequences", "0")
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: cannot read {bad / 'training.json'}")
