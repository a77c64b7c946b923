"""Whether the Hugging Face hub may be asked, decided up front so a missing network fails fast, not after retries.

Without this, transformers retries an unreachable hub five times with growing pauses and
prints a warning each time. Two choices are made here instead:
- `hub_offline()` forces the hub client into offline mode for a block of code, so local
  folders and the local cache are used and nothing is ever requested;
- `hub_reachable()` asks the hub's host once, with a short timeout, before any download.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline_requested() -> bool:
    """True when the user already set HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE."""
    return any(os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"} for var in OFFLINE_ENV_VARS)


@contextmanager
def hub_offline() -> Iterator[None]:
    """Within the block, huggingface_hub and transformers read only local files.

    huggingface_hub reads HF_HUB_OFFLINE once at import, so the module constant is switched
    too (transformers asks `huggingface_hub.is_offline_mode()`, which reads that constant).
    """
    import huggingface_hub.constants as hub_constants

    saved_env = {var: os.environ.get(var) for var in OFFLINE_ENV_VARS}
    saved_constant = hub_constants.HF_HUB_OFFLINE
    for var in OFFLINE_ENV_VARS:
        os.environ[var] = "1"
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = saved_constant
        for var, value in saved_env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def hub_endpoint() -> str:
    """The hub address in use (HF_ENDPOINT, else https://huggingface.co)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the hub's host opens within timeout_s.

    Name resolution has no timeout of its own, so the whole attempt runs in a daemon thread
    that is abandoned if it takes longer.
    """
    url = urlparse(hub_endpoint())
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    return bool(result and result[0])
