"""Routing: layer x expert load, entropy per layer, top tokens per expert, co-activation,
token-ID specialisation against chance, drop ratio vs position (workbench.analysis.routing)."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from app.store_access import cached, guarded, require_store
from workbench.analysis import routing
from workbench.store.reader import Store


def expert_top_tokens(store: Store, layer: int, expert: int, n: int) -> pd.DataFrame:
    """The tokens most often routed to one expert, with the share of their occurrences it got."""
    return store.df(
        """
        WITH slots AS (SELECT DISTINCT c.token_index, t.token FROM routing_choices AS c JOIN tokens AS t USING (token_index)
                       WHERE c.layer = ? AND c.expert = ?),
             seen AS (SELECT token, count(*) AS occurrences FROM tokens GROUP BY token)
        SELECT s.token, count(*) AS routed, seen.occurrences, count(*) / seen.occurrences AS share
        FROM slots AS s JOIN seen USING (token) GROUP BY s.token, seen.occurrences ORDER BY routed DESC LIMIT ?
        """,
        [layer, expert, n],
    )


st.title("Routing")
store = require_store()
load = guarded(routing.expert_load, store)
grid = load.pivot(index="layer", columns="expert", values="share")
st.plotly_chart(
    go.Figure(go.Heatmap(z=grid.to_numpy(), x=[f"e{e}" for e in grid.columns], y=[f"layer {l}" for l in grid.index],
                         colorscale="Viridis", colorbar={"title": "share"}))
    .update_layout(title="Expert load: share of routing slots"),
)  # fmt: skip

summary = guarded(routing.load_summary, store)
st.plotly_chart(
    px.line(summary.melt(id_vars="layer", value_vars=["entropy", "router_entropy"]), x="layer", y="value",
            color="variable", markers=True, title="Normalised entropy per layer: load H(f)/log E and router H_t/log E")
    .update_yaxes(range=[0, 1.05]).update_xaxes(dtick=1),
)  # fmt: skip

layers = sorted(load["layer"].unique())
c1, c2 = st.columns(2)
layer = c1.selectbox("Layer", layers)
experts = sorted(load[load["layer"] == layer]["expert"].unique())
expert = c2.selectbox("Expert", experts)
left, right = st.columns(2)
with left:
    top = cached(expert_top_tokens, store, int(layer), int(expert), 15)
    st.plotly_chart(px.bar(top.assign(shown=top["token"].map(repr)), x="shown", y="routed", hover_data=["share"],
                           title=f"Top tokens of expert {expert}, layer {layer}", labels={"shown": "token"}))  # fmt: skip
with right:
    matrix = guarded(routing.coactivation, store)[int(layer)]
    st.plotly_chart(px.imshow(matrix.to_numpy(), labels={"x": "expert", "y": "expert", "color": "tokens"},
                              title=f"Co-activation, layer {layer}", color_continuous_scale="Viridis"))  # fmt: skip

min_count = st.slider("Specialisation: token ids seen at least", 2, 50, 5)
spec = guarded(routing.token_specialisation, store, int(min_count))
st.plotly_chart(
    px.bar(spec.melt(id_vars="layer", value_vars=["specialisation", "chance"]), x="layer", y="value", color="variable",
           barmode="group", title="Token-ID specialisation: share routed to the token's most common expert vs shuffled ids").update_xaxes(dtick=1),
)  # fmt: skip

cf = st.slider("Simulated capacity factor", 0.5, 2.0, 1.0, 0.25)
drops = guarded(routing.drop_by_position, store, float(cf))
st.plotly_chart(px.line(drops, x="pos_from", y="drop_ratio", color="layer", markers=True,
                        title=f"Drop ratio vs position (capacity factor {cf:g})",
                        labels={"pos_from": "position bucket start"}))  # fmt: skip
