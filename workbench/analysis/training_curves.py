"""An SAE's training curves: the history rows its trainer logged in training.json (tokens,
FVU, L0, dead fraction, loss, throughput), which the comparison page draws against tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from sae.trainer import RECORD_FILE
from workbench.errors import WorkbenchError

CURVES = ("fvu", "l0", "dead_fraction")


def training_history(folder: str | Path) -> pd.DataFrame:
    """One row per logged step of the SAE trained into folder, sorted by tokens; empty when the
    folder holds no training.json (an SAE from elsewhere). A record that is not the trainer's
    raises a WorkbenchError naming the file."""
    path = Path(folder) / RECORD_FILE
    if not path.is_file():
        return pd.DataFrame(columns=["tokens", *CURVES])
    try:
        history = json.loads(path.read_text()).get("history")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise WorkbenchError(f"{path} is not a training record ({type(err).__name__})") from err
    if not isinstance(history, list) or not all(isinstance(row, dict) and "tokens" in row for row in history):
        raise WorkbenchError(f"{path} has no history of rows with tokens: not a training record of `workbench train`")
    frame = pd.DataFrame(history, columns=list(dict.fromkeys(["tokens", *CURVES, *(k for row in history for k in row)])))
    return frame.sort_values("tokens").reset_index(drop=True)
