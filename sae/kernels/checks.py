"""The kernels' input checks: a wrong tensor is the caller's mistake, reported as SAEError."""

from __future__ import annotations

from sae.errors import SAEError


def require(condition: bool, message: str) -> None:
    """Raise SAEError(message) unless condition; message names the parameter (`x`)."""
    if not condition:
        raise SAEError(message)
