"""Lazy neurons: % active per layer, firing-frequency histogram, a sequence's layer x token
heatmap, dead and dense neurons, one neuron's top tokens, and for mixture-of-experts models
each expert's neurons counted over the tokens routed to it (workbench.analysis.lazy_neurons)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from app.store_access import cached, guarded, require_store, sequence_count, sequence_tokens
from app.views.phenomenon_features import phenomenon_features_section
from workbench.analysis import lazy_neurons as lazy
from workbench.store.reader import Store


def dense_sections(store: Store, by_layer: pd.DataFrame, rule: str) -> None:
    """% active per layer and the firing-frequency histogram of the dense MLPs."""
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


def neuron_lists(store: Store, rule: str) -> None:
    """Dead and dense neurons of the dense MLPs, and one neuron's top tokens."""
    freqs = guarded(lazy.neuron_frequencies, store)
    freqs = freqs[freqs["rule"] == rule]
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
    layer = c1.selectbox("Layer", sorted(freqs["layer"].unique()))
    d_mlp = int(freqs[freqs["layer"] == layer]["neuron"].max()) + 1
    busiest = int(freqs[freqs["layer"] == layer].sort_values("fired")["neuron"].iloc[-1])
    neuron = c2.number_input("Neuron", 0, d_mlp - 1, busiest)
    st.dataframe(guarded(lazy.neuron_top_tokens, store, int(layer), int(neuron), 20), hide_index=True)


def expert_sections(store: Store, rule: str) -> None:
    """Per (layer, expert): % of its neurons active per routed token, and per expert of one
    layer how many neurons are dead, dense or unrouted."""
    st.subheader("Expert neurons (counted over the tokens routed to each expert)")
    freqs = guarded(lazy.expert_neuron_frequencies, store)
    summary = lazy.expert_summary(freqs[freqs["rule"] == rule])
    grid = summary.pivot(index="layer", columns="expert", values="pct_active")
    routed = summary.pivot(index="layer", columns="expert", values="routed")
    text = [[("unrouted" if r == 0 else f"{p:.0f}%") for p, r in zip(prow, rrow)] for prow, rrow in zip(grid.to_numpy(), routed.to_numpy())]
    st.plotly_chart(
        go.Figure(go.Heatmap(z=grid.to_numpy(), x=[f"e{e}" for e in grid.columns], y=[f"layer {l}" for l in grid.index],
                             text=text, texttemplate="%{text}", customdata=routed.to_numpy(), colorscale="Viridis",
                             hovertemplate="%{y} %{x}<br>%{z:.1f}% active per routed token<br>%{customdata} routed tokens<extra></extra>",
                             colorbar={"title": "% active"}))
        .update_layout(title=f"% of an expert's neurons active per routed token ({rule}; blank = no token routed)"),
    )  # fmt: skip
    layer = st.selectbox("Layer of the expert breakdown", sorted(summary["layer"].unique()))
    part = summary[summary["layer"] == layer]
    part = part.assign(live=part["neurons"] - part["dead"] - part["dense"] - part["unrouted"])
    counts = part.melt(id_vars="expert", value_vars=["dead", "dense", "live", "unrouted"], var_name="state", value_name="count")
    st.plotly_chart(
        px.bar(counts, x="expert", y="count", color="state", barmode="stack",
               color_discrete_map={"dead": "#d62728", "dense": "#1f77b4", "live": "#c7c7c7", "unrouted": "#ff7f0e"},
               title=f"Layer {layer}: each expert's neurons, dead (never fired on a routed token), dense, live or unrouted ({rule})",
               labels={"count": "neurons"})
        .update_xaxes(dtick=1),
    )  # fmt: skip
    st.dataframe(
        freqs[(freqs["rule"] == rule) & (freqs["layer"] == layer) & freqs["state"].isin(["dead", "unrouted"])]
        [["layer", "expert", "neuron", "tokens", "state"]],
        hide_index=True, height=200,
    )  # fmt: skip


def token_heatmap(store: Store, rule: str) -> None:
    """One sequence's layer x token active ratio (dense MLPs and MoE layers alike)."""
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


st.title("Lazy neurons")
store = require_store()
by_layer = guarded(lazy.active_percent_by_layer, store)
experts = cached(lazy.has_expert_rows, store)
rules = sorted(set(by_layer["rule"]) | (set(guarded(lazy.expert_neuron_frequencies, store)["rule"]) if experts else set()))
rule = st.radio("Activity rule", rules, horizontal=True, help="zero: a != 0; fat: |a| >= eps; cett: the CETT threshold rule")
if len(by_layer):
    dense_sections(store, by_layer, rule)
token_heatmap(store, rule)
if experts:
    expert_sections(store, rule)
if len(by_layer):
    neuron_lists(store, rule)
phenomenon_features_section(store, "neuron")
