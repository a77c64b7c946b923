"""`workbench app --store PATH [--port N] [--sae DIR ...]`: serve the Streamlit app on a store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import typer

from workbench.errors import WorkbenchError
from workbench.store.reader import Store

APP_SCRIPT = Path(__file__).resolve().parents[2] / "app" / "main.py"


def app_argv(port: int, headless: bool, host: str = "127.0.0.1") -> list[str]:
    """The `streamlit run` command line for the app, listening on host only."""
    return [
        sys.executable, "-m", "streamlit", "run", str(APP_SCRIPT),
        "--server.address", host, "--server.port", str(port), "--server.headless", str(headless).lower(),
        "--browser.gatherUsageStats", "false", "--client.toolbarMode", "viewer",
    ]  # fmt: skip


def app_env(stores: list[str], saes: list[str]) -> dict[str, str]:
    """Environment carrying the stores and SAE folders to the app (see app/store_access.py)."""
    return {
        **os.environ,
        "WORKBENCH_STORE": os.pathsep.join(str(Path(s).expanduser().resolve()) for s in stores),
        "WORKBENCH_SAES": os.pathsep.join(str(Path(s).expanduser().resolve()) for s in saes),
    }


def app_command(
    store: list[str] = typer.Option(..., "--store", help="store folder to browse (may still be capturing); repeat for several"),
    port: int = typer.Option(8501, "--port", help="port of the app"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (0.0.0.0: every interface, reachable from other machines)"),
    sae: list[str] = typer.Option([], "--sae", help="SAE folder(s) to show; each needs `workbench features DIR --store ...`"),
    headless: bool = typer.Option(True, "--headless/--open-browser", help="do not open a browser window"),
) -> None:
    """Browse phenomena and SAE features of a store in the Streamlit app."""
    for folder in store:
        Store.open(folder)  # a missing store fails here, with the command that makes one
    for folder in sae:
        if not (Path(folder) / "cfg.json").is_file():
            raise WorkbenchError(f"--sae {folder} is not an SAE folder (no cfg.json)")
    if not 0 < port < 65536:
        raise WorkbenchError(f"--port {port} is not a port number")
    print(f"workbench app on http://{host}:{port} (stores: {', '.join(store)}); Ctrl-C stops it", flush=True)
    try:
        done = subprocess.run(app_argv(port, headless, host), env=app_env(store, sae))
    except KeyboardInterrupt:
        return
    if done.returncode not in (0, -2, 130):
        raise WorkbenchError(f"streamlit exited with status {done.returncode}")
