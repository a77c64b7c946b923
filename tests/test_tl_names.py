"""TransformerLens names: unknown names and an unreachable hub give one line; a cached model loads and captures offline.

The hub is made unreachable on purpose (HF_ENDPOINT on a closed local port, HF_HOME in tmp),
so these tests never download, whatever network the machine has.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli_process import run_workbench
from tests.tiny_checkpoints import build_tiny_checkpoint
from workbench import Store
from workbench.errors import WorkbenchError
from workbench.models.hub_access import hub_reachable
from workbench.models.tl_names import load_tl_name

CLOSED_ENDPOINT = "http://127.0.0.1:9"  # the discard port: nothing listens, connections are refused at once
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def no_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face home and a hub that refuses connections, for this test and its subprocesses."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_ENDPOINT", CLOSED_ENDPOINT)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return home


def capture_args(tmp_path: Path, model: str) -> list[str]:
    data = tmp_path / "text.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    return [
        "capture", "--model", model, "--data", str(data), "--hooks", "blocks.0.hook_resid_post",
        "--tokens", "64", "--ctx", "16", "--batch-size", "2", "--store", str(tmp_path / "store"),
    ]  # fmt: skip


def test_unknown_name_names_close_matches_and_offline_choices() -> None:
    with pytest.raises(WorkbenchError) as info:
        load_tl_name("gpt2-smal", offline_choices=["tiny-relu", "all-MiniLM-L6-v2"])
    message = str(info.value)
    assert "unknown model 'gpt2-smal'" in message and "gpt2-small" in message
    assert "tiny-relu, all-MiniLM-L6-v2, or a local Hugging Face folder" in message
    assert "\n" not in message


def test_closed_endpoint_is_unreachable(no_hub: Path) -> None:
    assert hub_reachable(timeout_s=1.0) is False


def test_offline_env_without_cache_fails_with_one_line(no_hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WorkbenchError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set") as info:
        load_tl_name("gpt2", offline_choices=["tiny-relu"])
    assert "\n" not in str(info.value)


def test_unreachable_hub_is_one_error_line_and_exit_2(tmp_path: Path, no_hub: Path) -> None:
    result = run_workbench(*capture_args(tmp_path, "gpt2"), timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: TransformerLens model 'gpt2' is not in the local Hugging Face cache")
    assert f"{CLOSED_ENDPOINT} cannot be reached" in lines[0] and "tiny-relu" in lines[0]
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


def test_cached_model_loads_and_captures_with_the_hub_unreachable(tmp_path: Path, no_hub: Path) -> None:
    """A (tiny) gpt2 in the local hub cache is what HookedTransformer.from_pretrained('gpt2') loads offline."""
    repo = no_hub / "hub" / "models--gpt2"
    build_tiny_checkpoint("gpt2", repo / "snapshots" / SNAPSHOT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    result = run_workbench(*capture_args(tmp_path, "gpt2"), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    store = Store.open(tmp_path / "store")
    assert store.n_tokens() == 64
    assert store.activations("blocks.0.hook_resid_post").shape == (64, 32)
