"""The --device option: checked before anything is loaded or written, so a machine without
the asked-for accelerator gets one line instead of an assertion from deep inside torch."""

from __future__ import annotations

import torch

from workbench.errors import WorkbenchError


def check_device(device: str) -> None:
    """Raise a WorkbenchError unless torch can place tensors on `device` here."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise WorkbenchError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:N)") from err
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise WorkbenchError(f"--device {device} asked for, but no CUDA device is visible; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise WorkbenchError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif parsed.type != "cpu":
        raise WorkbenchError(f"--device {device} is not supported (cpu or cuda)")
