"""Named steps at which a writer can be made to kill itself, for the crash tests.

A test sets WORKBENCH_CRASH_AT to a step's name and runs a real command in a subprocess;
the process SIGKILLs itself on reaching that step, exactly as a power cut or `kill -9`
there would end it, and the test then checks what a reader sees and that a rerun completes.
"""

from __future__ import annotations

import os
import signal

CRASH_AT = "WORKBENCH_CRASH_AT"


def crash_point(step: str) -> None:
    """Kill this process with SIGKILL if WORKBENCH_CRASH_AT names this step."""
    if os.environ.get(CRASH_AT) == step:
        os.kill(os.getpid(), signal.SIGKILL)
