"""`workbench analyze` as a user runs it: summaries on a captured store, one line and exit 2 on bad input."""

from __future__ import annotations

import sys

import pytest

from tests.cli_process import run_workbench
from tests.phenomena_models import capture, dense_config, handle_for
from workbench import Store
from workbench.cli import main


@pytest.fixture(scope="module")
def lazy_store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lazy")
    return capture(handle_for(dense_config("relu")), folder, ["lazy"], tokens=200).root


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """The console entry point in this process (a subprocess costs seconds of imports each)."""
    monkeypatch.setattr(sys, "argv", ["workbench", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
        sys.exit(0)
    out = capsys.readouterr()
    return int(exit_info.value.code or 0), out.out, out.err


def test_analyze_prints_the_summary_and_saves_tables(lazy_store, monkeypatch, capsys):
    code, out, err = _cli(monkeypatch, capsys, "analyze", "--store", str(lazy_store))
    assert code == 0, err
    assert "Lazy neurons" in out and "pct_active" in out
    assert {"lazy_layer_summary", "lazy_neuron_frequency"} <= set(Store.open(lazy_store).info()["tables"])


def test_experts_on_a_dense_model_store_is_one_line_and_exit_2_from_the_real_command(lazy_store):
    done = run_workbench("analyze", "experts", "--store", str(lazy_store))
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"error: store {lazy_store} (model planted) has no 'experts' probe rows: "
        "capture with --probes experts (it needs a model with mixture-of-experts layers)"
    )


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("routing", "has no 'routing' probe rows: capture with --probes routing (it needs a model with mixture-of-experts layers)"),
        ("sinks", "has no 'sinks' probe rows: capture with --probes sinks"),
        ("neurons", "unknown analysis 'neurons'; choose from lazy, experts, sinks, routing or all"),
    ],
)
def test_bad_requests_say_so_in_one_line_with_exit_2(lazy_store, monkeypatch, capsys, which, message):
    code, out, err = _cli(monkeypatch, capsys, "analyze", which, "--store", str(lazy_store))
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and message in err


def test_analyze_all_on_a_store_without_probes_says_how_to_capture(tmp_path, monkeypatch, capsys):
    store = capture(handle_for(dense_config("relu")), tmp_path, [], tokens=100, hooks=["blocks.0.hook_resid_post"]).root
    code, out, err = _cli(monkeypatch, capsys, "analyze", "all", "--store", str(store))
    assert code == 2
    assert err.strip() == f"error: store {store} has no probe rows: capture with --probes all (or lazy,experts,sinks,routing)"
    code, out, err = _cli(monkeypatch, capsys, "analyze", "--store", str(tmp_path / "nowhere"))
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_zoo_moe_capture_with_all_probes_then_analyze_all(tmp_path, monkeypatch, capsys):
    store = tmp_path / "moe"
    args = ["--data", "builtin", "--tokens", "256", "--ctx", "128", "--batch-size", "2"]
    code, out, err = _cli(monkeypatch, capsys, "capture", "--model", "tiny-moe", *args, "--probes", "all", "--store", str(store))
    assert code == 0, err
    code, out, err = _cli(monkeypatch, capsys, "analyze", "all", "--store", str(store))
    assert code == 0, err
    for title in ("Lazy expert neurons", "Experts:", "Massive activations", "Sink_1", "Routing:", "Simulated drops"):
        assert title in out
    assert "Lazy neurons:" not in out  # no dense MLP: only the experts' neurons are counted
    code, out, err = _cli(monkeypatch, capsys, "capture", "--model", "tiny-relu", *args, "--probes", "experts", "--store", str(tmp_path / "relu"))
    assert code == 2
    assert err.strip() == "error: probe 'experts' cannot run: model tiny-relu has no mixture-of-experts layers"
