"""A CPU install without triton does the whole job: the real CLI captures, trains (step
auto), evaluates and runs a feature pass, and the app renders the SAE feature page, all in
a subprocess where `import triton` fails. Only the Triton kernels and their tests need it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BLOCK_TRITON = '''
import sys
class _NoTriton:
    """Refuses triton as a CPU machine without it would."""
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None
sys.meta_path.insert(0, _NoTriton())
'''

DRIVER = '''
import sys
from workbench.cli import main

def cli(*args):
    sys.argv = ["workbench", *args]
    try:
        main()
    except SystemExit as exc:
        assert not exc.code, f"workbench {args[0]} exited {exc.code}"

store, run, app_script = sys.argv[1:4]
hook = "blocks.1.hook_resid_post"
cli("capture", "--model", "tiny-relu", "--data", "builtin", "--hooks", hook, "--tokens", "4096",
    "--ctx", "64", "--batch-size", "16", "--store", store)
cli("train", "--store", store, "--hook", hook, "--d-sae", "256", "--k", "8", "--tokens", "16384",
    "--batch-size", "512", "--out", run, "--no-progress")
cli("eval", run, "--store", store, "--ce-sequences", "4")
cli("features", run, "--store", store)

import os
from streamlit.testing.v1 import AppTest
os.environ["WORKBENCH_STORE"], os.environ["WORKBENCH_SAES"] = store, run
at = AppTest.from_file(app_script, default_timeout=120)
at.switch_page("views/sae_features.py")
at.run()
assert not at.exception, [e.value for e in at.exception]
assert at.get("plotly_chart"), "the feature page drew no figure"
print("triton imported:", "triton" in sys.modules)
'''


def test_cpu_paths_run_without_triton(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCK_TRITON)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(REPO)])
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    done = subprocess.run(
        [sys.executable, str(driver), str(tmp_path / "store"), str(tmp_path / "run"), str(REPO / "app" / "main.py")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "triton imported: False" in done.stdout
    assert (tmp_path / "run" / "sae_weights.safetensors").is_file()


def test_the_block_really_refuses_triton(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCK_TRITON)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", "import triton"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode != 0 and "blocked by the test" in done.stderr
