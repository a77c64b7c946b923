"""Tokens coloured by activation, as HTML (the Neuronpedia look), escaped so text stays text."""

from __future__ import annotations

import html
from collections.abc import Sequence


def _shade(act: float, top: float) -> str:
    strength = 0.0 if top <= 0 else max(0.0, min(1.0, act / top))
    return f"rgba(255, 120, 0, {0.08 + 0.8 * strength:.2f})" if act > 0 else "transparent"


def token_span(token: str, act: float, top: float, centre: bool = False) -> str:
    shown = html.escape(token.replace("\n", "\u21b5")) or "&nbsp;"
    border = "border-bottom: 2px solid #333;" if centre else ""
    return (
        f'<span title="{act:.3f}" style="background:{_shade(act, top)};{border}'
        f'white-space:pre;font-family:monospace;padding:0 1px;">{shown}</span>'
    )


def coloured_tokens(tokens: Sequence[str], acts: Sequence[float], top: float, centre: int | None = None) -> str:
    """One line of tokens, each shaded by act / top, with its value on hover."""
    spans = "".join(token_span(t, float(a), top, i == centre) for i, (t, a) in enumerate(zip(tokens, acts)))
    return f'<div style="line-height:1.9;margin:2px 0;">{spans}</div>'
