"""Lazy neurons: % active per layer, firing-frequency histogram, a sequence's layer x token
heatmap, dead and dense neurons, and one neuron's top tokens (workbench.analysis.lazy_neurons)."""

from __future__ import annotations

import numpy as np
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from app.store_access import cached, guarded, require_store, sequence_count, sequence_tokens
from app.views.phenomenon_features import phenomenon_features_section
from workbench.analysis import lazy_neurons as lazy

st.title("Lazy neurons")
store = require_store()
by_layer = guarded(lazy.active_percent_by_layer, store)
rules = sorted(by_layer["rule"].unique())
rule = st.radio("Activity rule", rules, horizontal=True, help="zero: a > 0; fat: |a| > eps; cett: the CETT threshold rule")
chosen = by_layer[by_layer["rule"] == rule]
st.plotly_chart(
    px.bar(chosen, x="layer", y="pct_active", labels={"pct_active": "% of MLP neurons active per token"},
           title=f"Active neurons per layer ({rule})").update_xaxes(dtick=1),
)  # fmt: skip

freqs = guarded(lazy.neuron_frequencies, store)
freqs = freqs[freqs["rule"] == rule]
layers = sorted(freqs["layer"].unique())
shown = st.multiselect("Layers in the histogram", layers, default=layers)
live = freqs[freqs["layer"].isin(shown) & (freqs["fired"] > 0)]
fig = go.Figure()
for layer in shown:
    part = live[live["layer"] == layer]
    fig.add_histogram(x=np.log10(part["frequency"]), name=f"layer {layer}", opacity=0.6, nbinsx=40)
fig.update_layout(barmode="overlay", title="Neuron firing frequency (log10; dead neurons listed below)",
                  xaxis_title="log10 firing frequency", yaxis_title="neurons")  # fmt: skip
st.plotly_chart(fig)

activity = guarded(lazy.token_activity, store, rule)
n_seq = cached(sequence_count, store)
seq = st.number_input("Sequence for the layer x token heatmap", 0, max(n_seq - 1, 0), 0)
tokens = guarded(sequence_tokens, store, int(seq))
heat = activity[activity["token_index"].isin(tokens["token_index"])]
grid = heat.pivot(index="layer", columns="token_index", values="active_frac").reindex(columns=tokens["token_index"])
labels = [f"{p}:{t}" for p, t in zip(tokens["pos"], tokens["token"])]
st.plotly_chart(
    go.Figure(go.Heatmap(z=grid.to_numpy(), x=labels, y=[f"layer {l}" for l in grid.index], colorscale="Viridis",
                         colorbar={"title": "active"})).update_layout(title=f"Active ratio, sequence {seq} ({rule})"),
)  # fmt: skip

left, right = st.columns(2)
with left:
    st.subheader("Dead neurons")
    st.dataframe(lazy.dead_neurons(freqs)[["layer", "neuron", "tokens"]], hide_index=True, height=240)
with right:
    st.subheader("Dense neurons")
    cut = st.slider("Dense when firing on at least", 0.5, 1.0, lazy.DENSE_FREQUENCY, 0.01)
    st.dataframe(lazy.dense_neurons(freqs, cut)[["layer", "neuron", "frequency"]], hide_index=True, height=240)

st.subheader("A neuron's top tokens")
c1, c2 = st.columns(2)
layer = c1.selectbox("Layer", layers)
d_mlp = int(freqs[freqs["layer"] == layer]["neuron"].max()) + 1
neuron = c2.number_input("Neuron", 0, d_mlp - 1, int(freqs[freqs["layer"] == layer].sort_values("fired")["neuron"].iloc[-1]))
st.dataframe(guarded(lazy.neuron_top_tokens, store, int(layer), int(neuron), 20), hide_index=True)

phenomenon_features_section(store, "neuron")
