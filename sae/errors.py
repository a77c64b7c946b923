"""The SAE library's one exception type for bad input, phrased for Python callers.

A message names the parameters it is about in Python spelling inside backticks, `name` or
`name=value` (`k=20`, `step="autograd"`), so a front end can respell each one for its own
users: a command line prints its flag (--k 20, --step autograd) where it has one.
"""

from __future__ import annotations

import re
from collections.abc import Callable

#: One parameter reference in a message: group 1 the name, group 2 the value (or None).
PARAMETER = re.compile(r"`([A-Za-z_]\w*)(?:=([^`]+))?`")


class SAEError(ValueError):
    """A user-facing error of the SAE library: the message says what went wrong and what to do."""

    def respell(self, spell: Callable[[str, str | None], str]) -> str:
        """The message with each parameter reference replaced by spell(name, value or None)."""
        return PARAMETER.sub(lambda match: spell(match.group(1), match.group(2)), str(self))
