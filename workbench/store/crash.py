"""Named crash points: where a writer may die, so tests can kill it at exactly that step.

Crash safety is a claim about every instant between file-system steps; a test that kills on
a timer hits some of them by luck. Each step a writer takes calls crash_point(name), and a
process started with WORKBENCH_CRASH_AT=name (or name:N for its N-th time there) sends itself
SIGKILL at that point: no cleanup, no flush, as a power cut or the OOM killer would.
"""

from __future__ import annotations

import os
import signal
import threading

_SPEC = os.environ.get("WORKBENCH_CRASH_AT", "")
_NAME, _, _NTH = _SPEC.partition(":")
_seen = 0
_lock = threading.Lock()


def crash_point(name: str) -> None:
    """Die here if WORKBENCH_CRASH_AT names this point (and this is its N-th passage)."""
    global _seen
    if name != _NAME:
        return
    with _lock:
        _seen += 1
        if _seen == int(_NTH or 1):
            os.kill(os.getpid(), signal.SIGKILL)
