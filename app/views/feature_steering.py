"""The feature page's steering section: a small form that generates from the store's model with
the feature added or clamped at the SAE's hook (workbench/steering.py), the steered
continuation beside the clean one, and the next-token logits that moved most."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
import streamlit as st

from workbench.errors import WorkbenchError
from workbench.steering import MODES, steer_loaded


def steering_section(handle: Any, reason: str, sae_model: Any, hook: str, feature: int, max_activation: float) -> None:
    """Draw the section for one feature; handle is None (with reason) when the model does not load."""
    st.subheader("Steer generation")
    if handle is None or sae_model is None:
        st.info(f"Steering needs the model and the SAE weights: {reason or 'the SAE folder is gone'}")
        return
    if handle.kind != "decoder":
        st.info(f"{handle.name} is an {handle.kind}: steering needs a decoder that generates text.")
        return
    with st.form(f"steer-{feature}"):
        prompt = st.text_area("Prompt", "def load(path):\n    ", height=80)
        cols = st.columns(3)
        mode = cols[0].radio("Mode", MODES, horizontal=True, help="add: strength x W_dec[f] at every position; "
                             "clamp: the feature's activation set to strength everywhere")  # fmt: skip
        strength = cols[1].number_input("Strength (activation units)", value=float(round(4 * max(max_activation, 1.0), 1)))
        tokens = int(cols[2].number_input("New tokens", 1, 64, 16))
        submitted = st.form_submit_button("Generate")
    if not submitted:
        st.caption(f"Greedy generation, clean and with feature {feature} steered at {hook}. "
                   f"Its largest stored activation is {max_activation:.3g}.")  # fmt: skip
        return
    try:
        result = steer_loaded(handle, sae_model, hook, feature, mode, strength, prompt, tokens)
    except WorkbenchError as err:
        st.info(str(err))
        return
    left, right = st.columns(2)
    left.markdown("**Clean**")
    left.code(prompt + result.clean_text, language=None)
    right.markdown(f"**Steered** ({mode} {strength:g})")
    right.code(prompt + result.steered_text, language=None)
    moved = result.moved
    fig = go.Figure(go.Bar(x=moved["change"], y=[repr(t) for t in moved["token"]], orientation="h",
                           marker_color=["#2b8a3e" if c > 0 else "#c92a2a" for c in moved["change"]],
                           customdata=moved[["clean", "steered"]], hovertemplate="%{y}: %{customdata[0]:.2f} -> %{customdata[1]:.2f}"))  # fmt: skip
    st.plotly_chart(fig.update_layout(title="Next-token logits after the prompt that moved most (steered - clean)", height=520)
                    .update_yaxes(autorange="reversed"))  # fmt: skip
