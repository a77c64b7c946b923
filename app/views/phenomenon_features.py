"""The phenomena pages' section "Features on these tokens": for super experts, sink heads and
dead or dense neurons, the SAE features that fire most on the tokens behind them, against how
often each feature fires anywhere (workbench.analysis.links; `workbench links` writes the tables)."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from app.store_access import cached, sae_frame
from workbench.analysis.link_reader import features_on, links_state
from workbench.store.reader import Store

#: kind -> (what a unit is called, the marks that single it out)
KINDS = {"expert": ("expert", "super expert"), "head": ("head", "sink head"), "neuron": ("neuron", "dead or dense neuron")}


def phenomenon_features_section(store: Store, kind: str) -> None:
    """Draw the section for one kind of unit (expert, head, neuron)."""
    unit_name, marked_name = KINDS[kind]
    st.subheader("Features on these tokens")
    names = [n for n in sae_frame(store)["name"] if cached(links_state, store, n) != "missing"]
    if not names:
        st.info(f"No SAE links in this store: run `workbench features SAE_DIR --store {store.root}` then "
                f"`workbench links --store {store.root}`.")  # fmt: skip
        return
    c1, c2 = st.columns(2)
    name = c1.selectbox("SAE", names, key=f"links_sae_{kind}")
    every = c2.checkbox(f"every {unit_name}, not only each {marked_name}", key=f"links_all_{kind}") if kind != "neuron" else False
    rows = cached(features_on, store, name, kind, not every)
    if not len(rows) and not every:
        st.caption(f"No {marked_name} here has a feature of '{name}' firing on its tokens; showing every {unit_name}.")
        rows = cached(features_on, store, name, kind, False)
    if not len(rows):
        st.caption(f"No {unit_name} here has a feature of '{name}' firing on its tokens.")
        return
    units = rows[["layer", "unit", "marked", "tokens"]].drop_duplicates()
    labels = [f"layer {l} {unit_name} {u}" + (f" ({m})" if m else "") for l, u, m in zip(units["layer"], units["unit"], units["marked"])]
    pick = st.selectbox(f"{unit_name.capitalize()}", range(len(units)), format_func=lambda i: labels[i], key=f"links_unit_{kind}")
    layer, unit, tokens = (int(units.iloc[pick][c]) for c in ("layer", "unit", "tokens"))
    top = rows[(rows["layer"] == layer) & (rows["unit"] == unit)]
    fig = go.Figure()
    fig.add_bar(x=[f"f{f}" for f in top["feature"]], y=top["share"], name=f"share of the {tokens} tokens behind it")
    fig.add_bar(x=[f"f{f}" for f in top["feature"]], y=top["density"], name="share of all tokens (density)")
    fig.update_layout(barmode="group", title=f"SAE '{name}': features firing most on the tokens of {labels[pick]}",
                      yaxis_title="share of tokens the feature fires on", xaxis_title="feature")  # fmt: skip
    st.plotly_chart(fig)
    st.dataframe(rows.drop(columns="kind"), hide_index=True, height=240)
    st.caption("Open a feature on the SAE features page (choose the SAE and type its number) for its examples.")
