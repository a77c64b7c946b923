"""Super experts: layer x expert max |down_proj output| (log colour), the rule's verdicts with
the tokens behind each outlier, and the massive-activation curve (workbench.analysis.super_experts)."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from app.store_access import guarded, require_store
from app.views.phenomenon_features import phenomenon_features_section
from workbench.analysis import super_experts as se

st.title("Super experts")
store = require_store()
maxima = guarded(se.expert_maxima, store)
n_layers = int(store.info()["model"]["n_layers"])
c1, c2 = st.columns(2)
percentile = c1.slider("Percentile cut", 50.0, 99.9, se.PERCENTILE, 0.1)
ratio = c2.slider("and above max(a) /", 2.0, 100.0, se.MAX_RATIO, 1.0)
marked = se.mark_super_experts(maxima, n_layers, percentile=percentile, max_ratio=ratio)

grid = marked.pivot(index="layer", columns="expert", values="a")
fig = go.Figure(go.Heatmap(z=np.log10(grid.to_numpy().clip(min=1e-6)), x=[f"e{e}" for e in grid.columns],
                           y=[f"layer {l}" for l in grid.index], customdata=grid.to_numpy(),
                           hovertemplate="%{y} %{x}: a = %{customdata:.3g}<extra></extra>",
                           colorscale="Magma", colorbar={"title": "log10 a"}))  # fmt: skip
supers = marked[marked["is_super"]]
fig.add_scatter(x=[f"e{e}" for e in supers["expert"]], y=[f"layer {l}" for l in supers["layer"]], mode="markers",
                marker={"symbol": "star", "size": 14, "color": "cyan"}, name="super expert")  # fmt: skip
fig.update_layout(title="max |down_proj output| per expert (log colour)")
st.plotly_chart(fig)

st.subheader(f"Verdicts: {len(supers)} super expert(s), threshold {marked['threshold'].iloc[0]:.3g}")
top_tokens = guarded(se.expert_top_tokens, store, 3)
verdict = marked.sort_values("a", ascending=False).head(12)
causes = (
    top_tokens.assign(where=lambda t: t["token"].map(repr) + " @pos " + t["pos"].astype(str))
    .groupby(["layer", "expert"])["where"].agg(", ".join).rename("top tokens")
)  # fmt: skip
st.dataframe(
    verdict.join(causes, on=["layer", "expert"])[["layer", "expert", "a", "ratio_to_median", "is_super", "routed", "channel", "top tokens"]],
    hide_index=True,
)

massive = guarded(se.massive_activations, store)
curve = go.Figure()
for col, name in (("top1", "top-1"), ("top2", "top-2"), ("top3", "top-3"), ("median", "median")):
    if col in massive:
        curve.add_scatter(x=massive["layer"], y=massive[col], mode="lines+markers", name=name)
curve.update_layout(title="Massive activations: largest |h| in the residual stream per layer", yaxis_type="log",
                    xaxis_title="layer", yaxis_title="|h|", xaxis_dtick=1)  # fmt: skip
st.plotly_chart(curve)
channels = [c for c in massive.columns if c.endswith(("_channel", "_token"))]
st.dataframe(massive[["layer", "top1", "median", "ratio", "is_massive", *channels]], hide_index=True)

phenomenon_features_section(store, "expert")
