"""sae/ stands alone: with workbench and triton hidden (as if not installed), every sae module
imports and a TopK SAE trains on CPU without loading the store's readers (duckdb, pandas,
pyarrow); and its errors name Python parameters, which the CLI turns into its flags.

triton is hidden rather than checked for in sys.modules because torch itself imports it,
where installed, on building any optimizer; hidden, a CPU path of sae that needed it fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sae.errors import SAEError
from workbench.cli import _register, flag_message

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys

HIDDEN = ("workbench", "triton")

class Hide:
    \"\"\"A meta-path finder that finds nothing of the hidden packages, else what `finder` finds.\"\"\"
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find else None
    def invalidate_caches(self):
        getattr(self.finder, "invalidate_caches", lambda: None)()

sys.meta_path[:] = [Hide(finder) for finder in sys.meta_path]
hidden = []
for name in HIDDEN:
    try:
        __import__(name)
    except ImportError:
        hidden.append(name)

import sae, sae.trainer, sae.step_choice, sae.fused_step, sae.graph_step, sae.io, sae.synthetic
import sae.distributed, sae.evaluate, sae.kernels
import torch
from sae.config import TrainConfig
from sae.data import TensorSource
from sae.evaluate import reconstruction_metrics
from sae.trainer import Trainer

torch.manual_seed(0)
data = torch.randn(2048, 16)
config = TrainConfig(arch="topk", d_in=16, d_sae=64, k=4, tokens=8 * 128, batch_size=128, init_tokens=512)
trainer = Trainer.start(config, TensorSource(data), sys.argv[1], command=["test"])
model = trainer.fit(progress=False)
metrics = reconstruction_metrics(model, data.split(512))
print(json.dumps({
    "hidden": hidden,
    "step": trainer.step,
    "kind": trainer.step_kind,
    "fvu": metrics["fvu"],
    "loaded": sorted(name for name in ("duckdb", "pandas", "pyarrow", *HIDDEN) if name in sys.modules),
}))
"""


def test_sae_imports_and_trains_with_workbench_and_triton_hidden(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "run")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["hidden"] == ["workbench", "triton"], "the hiding finder let a hidden package through"
    assert result["step"] == 8 and result["kind"] == "autograd"
    assert 0 <= result["fvu"] < 1
    assert result["loaded"] == [], f"sae loaded {result['loaded']}"
    assert (tmp_path / "run" / "cfg.json").is_file()


def test_errors_name_parameters_and_the_cli_names_flags():
    err = SAEError('`k=20` must be between 1 and d_sae=16; use `step="autograd"`, `resume` or another `out`')
    assert str(err).startswith("`k=20` must be")
    _register()
    assert flag_message(err, ["train", "--store", "s"]) == (
        "--k 20 must be between 1 and d_sae=16; use --step autograd, --resume or another --out"
    )
    # `workbench eval` has no --k, --step or --resume: those keep their Python names
    assert flag_message(err, ["eval", "folder"]) == (
        'k=20 must be between 1 and d_sae=16; use step="autograd", resume or another out'
    )
