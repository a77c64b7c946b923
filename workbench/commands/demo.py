"""`workbench demo`: the main job end to end on the built-in models, ending in the app.

The demo is a list of ordinary `workbench` commands, printed before each runs, so a user can
copy any step and change it. Every step resumes or is skipped when its output is already
there, so a second `workbench demo` goes straight to the app.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import typer

from sae.registry import rule_names, training_rule
from workbench.commands.train import flag
from workbench.errors import WorkbenchError
from workbench.models.english_corpus import ENGLISH_SPEC

SAE_HOOK = "blocks.2.hook_resid_post"


def capture_steps(root: Path, tokens: int) -> list[list[str]]:
    """Captures of the three built-in models, each with every probe that applies, then their analyses.
    The zoo models read Python source (what they were trained on); MiniLM, trained on natural
    language, reads the English prose of the Python reference manual."""
    plan = [("tiny-relu", tokens, 32, "builtin"), ("tiny-moe", tokens // 2, 32, "builtin"),
            ("all-MiniLM-L6-v2", tokens // 16, 16, ENGLISH_SPEC)]  # fmt: skip
    steps = []
    for model, n, batch, data in plan:
        store = str(root / model)
        hook = "blocks.3.hook_resid_post" if model.startswith("all-MiniLM") else SAE_HOOK
        steps.append(["capture", "--model", model, "--data", data, "--hooks", hook, "--probes", "all",
                      "--tokens", str(n), "--ctx", "128", "--batch-size", str(batch), "--store", store])
        steps.append(["analyze", "all", "--store", store])
    return steps


MOE_SAE_RULE = "topk"


def _train_step(store: str, rule: str, out: Path, train_tokens: int) -> list[str]:
    sparsity = [arg for name, value in training_rule(rule).short_run_settings.items() for arg in (flag(name), str(value))]
    return ["train", "--store", store, "--hook", SAE_HOOK, "--arch", rule, "--expansion", "8", *sparsity,
            "--tokens", str(train_tokens), "--batch-size", "1024", "--out", str(out)]  # fmt: skip


def sae_plan(root: Path) -> list[tuple[Path, str, Path]]:
    """(store, rule, SAE folder) of the demo's SAEs: one per registered rule on tiny-relu, a TopK
    one on tiny-moe (so features meet experts, routing and massive activations)."""
    plan = [(root / "tiny-relu", rule, root / "saes" / rule) for rule in rule_names()]
    return [*plan, (root / "tiny-moe", MOE_SAE_RULE, root / "saes" / f"moe-{MOE_SAE_RULE}")]


def sae_steps(root: Path, train_tokens: int) -> list[list[str]]:
    """An SAE of each registered rule (TopK, Mutual Choice, GBA) on one hook of tiny-relu, with
    the sparsity settings its registration gives for short runs, and a TopK SAE on tiny-moe, then
    their feature passes and the links of every feature to its store's phenomena."""
    steps = []
    for store, rule, out in sae_plan(root):
        if not (out / "cfg.json").is_file():
            steps.append(_train_step(str(store), rule, out, train_tokens))
        steps.append(["features", str(out), "--store", str(store), "--name", rule.replace("-", "_")])
    steps += [["links", "--store", str(store)] for store in dict.fromkeys(store for store, _, _ in sae_plan(root))]
    return steps


def _run(args: list[str]) -> None:
    print(f"\n$ workbench {shlex.join(args)}", flush=True)
    done = subprocess.run([sys.executable, "-m", "workbench.cli", *args])
    if done.returncode != 0:
        raise WorkbenchError(f"demo step failed (exit {done.returncode}): workbench {shlex.join(args)}")


def demo_command(
    root: str = typer.Option("stores/demo", "--root", help="folder for the demo's stores and SAEs"),
    tokens: int = typer.Option(100_000, "--tokens", help="tokens captured from tiny-relu (the others take fewer)"),
    train_tokens: int = typer.Option(400_000, "--train-tokens", help="tokens each SAE trains on (the store is cycled)"),
    app: bool = typer.Option(True, "--app/--no-app", help="start the app at the end"),
    port: int = typer.Option(8501, "--port", help="port of the app"),
) -> None:
    """Capture the zoo models and MiniLM, analyse, train SAEs, then open the app."""
    folder = Path(root)
    for step in capture_steps(folder, tokens) + sae_steps(folder, train_tokens):
        _run(step)
    if app:
        stores = [arg for model in ("tiny-relu", "tiny-moe", "all-MiniLM-L6-v2") for arg in ("--store", str(folder / model))]
        saes = [arg for _, _, sae in sae_plan(folder) for arg in ("--sae", str(sae))]
        _run(["app", *stores, *saes, "--port", str(port)])
