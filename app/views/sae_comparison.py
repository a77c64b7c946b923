"""SAE comparison: TopK vs Mutual Choice vs GBA on the same hook and the same stored tokens:
FVU, L0, dead fraction and density curves side by side (from the feature passes, which cover
every stored token, the SAEs' training tokens included; `workbench eval` scores held-out tokens),
and each SAE's training curves against tokens (from its training.json)."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import streamlit as st
from plotly.colors import DEFAULT_PLOTLY_COLORS
from plotly.subplots import make_subplots

from app.store_access import cached, require_store, sae_frame
from workbench.analysis.features import stats_table
from workbench.analysis.training_curves import CURVES, training_history
from workbench.errors import WorkbenchError
from workbench.store.reader import Store, sql_identifier


def densities(store: Store, name: str) -> np.ndarray:
    return store.df(f"SELECT density FROM {sql_identifier(stats_table(name))} ORDER BY density DESC")["density"].to_numpy()


st.title("SAE comparison")
store = require_store()
saes = sae_frame(store)
if not len(saes):
    st.info(f"No SAE has been passed over this store: train TopK, Mutual Choice and GBA SAEs on one hook, then run "
            f"`workbench features SAE_DIR --store {store.root}` for each.")  # fmt: skip
    st.stop()
hooks = sorted(saes["hook"].unique())
hook = st.selectbox("Hook", hooks)
same = saes[saes["hook"] == hook].sort_values("rule")
chosen = st.multiselect("SAEs", same["name"].tolist(), default=same["name"].tolist())
rows = same[same["name"].isin(chosen)]
labels = [f"{n} ({r})" for n, r in zip(rows["name"], rows["rule"])]

bars = make_subplots(rows=1, cols=3, subplot_titles=("FVU (lower is better)", "L0 (active features per token)", "dead fraction"))
for col, metric in enumerate(("fvu", "l0", "dead_fraction"), start=1):
    bars.add_bar(x=labels, y=rows[metric], showlegend=False, row=1, col=col)
bars.update_yaxes(range=[0, 1], row=1, col=3)  # a fraction: all-zero bars still read as 0, not as an empty axis
bars.update_layout(title=f"{len(rows)} SAE(s) on {hook}, same {int(rows['tokens'].max()) if len(rows) else 0:,} tokens", height=420)
st.plotly_chart(bars)
st.caption("Over all stored tokens, the SAEs' training tokens included; `workbench eval` scores the held-out ones.")

training = make_subplots(rows=1, cols=3, subplot_titles=("FVU while training", "L0 while training", "dead fraction while training"))
untracked, histories = [], []
for n, (label, folder) in enumerate(zip(labels, rows["folder"])):
    colour = DEFAULT_PLOTLY_COLORS[n % len(DEFAULT_PLOTLY_COLORS)]  # one colour per SAE in all three panels
    try:
        history = training_history(folder)
    except WorkbenchError as err:
        st.warning(str(err))
        continue
    if not len(history):
        untracked.append(label)
        continue
    histories.append(history)
    for col, metric in enumerate(CURVES, start=1):
        training.add_scatter(x=history["tokens"], y=history[metric], mode="lines", name=label, legendgroup=label,
                             line_color=colour, showlegend=col == 1, row=1, col=col)  # fmt: skip
if len(training.data):
    training.update_xaxes(title_text="training tokens")
    # an SAE's first steps (FVU above 1, L0 before its sparsity settles) would set the scale:
    # the panels show the range the runs end in; hovering still reads every point
    training.update_yaxes(range=[0, 1.05], row=1, col=1)
    finals = [float(h["l0"].iloc[-1]) for h in histories if len(h)]
    if finals:
        training.update_yaxes(range=[0, 2 * max(finals)], row=1, col=2)
    training.update_yaxes(range=[0, 1], row=1, col=3)
    training.update_layout(title="Training curves (training.json history; TensorBoard: `tensorboard --logdir SAE_DIR`)", height=420)
    st.plotly_chart(training)
if untracked:
    st.caption(f"No training.json (trained elsewhere, or its folder is gone): {', '.join(untracked)}")

curves = go.Figure()
for name, label in zip(rows["name"], labels):
    d = cached(densities, store, name)
    live = d[d > 0]
    curves.add_scatter(x=np.arange(1, len(live) + 1) / max(len(d), 1), y=live, mode="lines", name=label)
curves.update_layout(title="Feature density curves: features ranked by density (x: rank / d_sae)", yaxis_type="log",
                     xaxis_title="feature rank / d_sae", yaxis_title="density (fraction of tokens)")  # fmt: skip
st.plotly_chart(curves)
hist = go.Figure()
for name, label in zip(rows["name"], labels):
    d = cached(densities, store, name)
    hist.add_histogram(x=np.log10(d[d > 0]), name=label, opacity=0.6, nbinsx=40)
hist.update_layout(barmode="overlay", title="Feature density histogram (log10)", xaxis_title="log10 density")
st.plotly_chart(hist)
st.dataframe(rows[["name", "rule", "d_sae", "fvu", "l0", "dead_fraction", "tokens", "folder"]], hide_index=True)
