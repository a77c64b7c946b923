"""Attention sinks: layer x head alpha_1, Sink_1 per layer, hidden-sink tokens, a layer x head
alpha heatmap per special token ([CLS], [SEP], <bos>...), and one head's pattern on a chosen
text (workbench.analysis.attention_sinks; the pattern runs the model)."""

from __future__ import annotations

import plotly.express as px
import plotly.graph_objects as go
import streamlit as st
import torch

from app.store_access import cached, guarded, model_or_reason, require_store
from app.views.phenomenon_features import phenomenon_features_section
from workbench.analysis import attention_sinks as sinks

st.title("Attention sinks")
store = require_store()
eps = st.slider("Sink threshold eps on alpha_1", 0.05, 0.9, sinks.SINK_EPS, 0.05)
grid = guarded(sinks.first_position_grid, store)
st.plotly_chart(
    go.Figure(go.Heatmap(z=grid.to_numpy(), x=[f"h{h}" for h in grid.columns], y=[f"layer {l}" for l in grid.index],
                         zmin=0, zmax=1, colorscale="Blues", colorbar={"title": "alpha_1"}))
    .update_layout(title="Mean attention to the first position (alpha_1) per head"),
)  # fmt: skip
rate = guarded(sinks.sink_rate, store, float(eps))
st.plotly_chart(px.bar(rate, x="layer", y="sink_rate", title=f"Sink_1 (% of sample-heads with alpha_1 > {eps:g})",
                       labels={"sink_rate": "Sink_1 %"}))  # fmt: skip

hidden = guarded(sinks.hidden_sinks, store)
st.subheader("Hidden sinks: later positions with alpha > 0.1")
if len(hidden):
    top = hidden.head(25).assign(shown=lambda f: f["token"].map(repr))
    st.plotly_chart(px.bar(top, x="shown", y="occurrences", hover_data=["heads", "mean_alpha"],
                           title="Hidden-sink tokens by frequency", labels={"shown": "token"}))  # fmt: skip
    st.dataframe(hidden, hide_index=True, height=220)
else:
    st.caption("No position after the first reached alpha > 0.1 in any head.")

st.subheader("Special tokens: alpha per head")
if cached(sinks.has_special_rows, store):
    special = guarded(sinks.special_token_alpha, store)
    for token, part in special.groupby("special", sort=True):
        grid = part.pivot(index="layer", columns="head", values="alpha")
        st.plotly_chart(
            go.Figure(go.Heatmap(z=grid.to_numpy(), x=[f"h{h}" for h in grid.columns], y=[f"layer {l}" for l in grid.index],
                                 zmin=0, zmax=1, colorscale="Blues", colorbar={"title": "alpha"}))
            .update_layout(title=f"Mean alpha of {token} per head ({int(part['occurrences'].max())} occurrences)"),
        )  # fmt: skip
else:
    st.caption("This store was captured before special-token rows existed: recapture with --probes sinks to see them.")

st.subheader("One head's attention pattern")
handle, reason = model_or_reason(store)
if handle is None:
    st.info(f"The model '{store.model_name}' cannot be loaded here, so patterns of new text are off: {reason}")
else:
    text = st.text_area("Text", "The cat sat on the mat. Then, it slept.\nThe end.")
    c1, c2 = st.columns(2)
    layer = c1.number_input("Layer", 0, handle.n_layers - 1, 0)
    n_heads = int(handle.model.cfg.n_heads)
    head = c2.number_input("Head", 0, n_heads - 1, 0)
    ids = handle.window_ids(text, limit=256)
    hook = f"blocks.{int(layer)}.attn.hook_pattern"
    pattern = handle.run(torch.tensor([ids]), [hook])[hook][0, int(head)].float().numpy()
    labels = [f"{i}:{t}" for i, t in enumerate(handle.token_strings(ids))]
    st.plotly_chart(
        go.Figure(go.Heatmap(z=pattern, x=labels, y=labels, colorscale="Blues", zmin=0, zmax=1))
        .update_layout(title=f"Layer {int(layer)} head {int(head)}: query (rows) attends to key (columns)", height=600)
        .update_yaxes(autorange="reversed"),
    )  # fmt: skip

phenomenon_features_section(store, "head")
