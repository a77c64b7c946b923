"""SAE features, one page per feature in the manner of Neuronpedia: top activating examples in
context, examples from activation intervals, density and activation histograms, top and bottom
logits (W_dec[f] @ W_U), co-firing features, new text through model + SAE, steering the
feature during generation (app/views/feature_steering.py), where the feature meets the phenomena
(app/views/feature_links.py); search by token."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
import torch

from app.render import coloured_tokens
from app.store_access import (
    cached,
    feature_tables,
    load_sae_folder,
    model_or_reason,
    require_store,
    sae_frame,
    token_text,
    version,
)
from app.views.feature_links import feature_links_section
from app.views.feature_steering import steering_section
from workbench.analysis.feature_page import FeatureTables
from workbench.analysis.link_reader import opening_feature
from workbench.store.reader import Store


def token_search(store: Store, name: str, token: str) -> pd.DataFrame:
    return FeatureTables(store, name).search_token(token)


st.title("SAE features")
store = require_store()
saes = sae_frame(store)
if not len(saes):
    st.info(f"No SAE has been passed over this store: run `workbench features SAE_DIR --store {store.root}` "
            "(train one with `workbench train`).")  # fmt: skip
    st.stop()
name = st.selectbox("SAE", saes["name"].tolist(), format_func=lambda n: f"{n} ({saes.set_index('name').loc[n, 'rule']})")
sae_row = saes.set_index("name").loc[name]
tables = feature_tables(str(store.root), name, version(store))
text = token_text(str(store.root), version(store))
st.caption(f"{sae_row['rule']} on `{sae_row['hook']}`, d_sae {int(sae_row['d_sae'])}, L0 {sae_row['l0']:.1f}, "
           f"FVU {sae_row['fvu']:.3f}, dead {100 * sae_row['dead_fraction']:.1f}% over {int(sae_row['tokens']):,} tokens")  # fmt: skip

with st.expander("Find features by token", expanded=False):
    query = st.text_input("Token (exact text, surrounding spaces ignored)", "")
    if query.strip():
        found = cached(token_search, store, name, query)
        if len(found):
            st.dataframe(found, hide_index=True)
        else:
            st.caption("No stored token matches, or none fires a feature.")

live = tables.stats[tables.stats["count"] > 0]
feature = int(st.number_input("Feature", 0, tables.d_sae - 1, cached(opening_feature, store, name), key="feature"))
page = tables.page(feature, text)

m = st.columns(4)
m[0].metric("density", f"{page.density:.3%}")
m[1].metric("fires on", f"{page.count:,} tokens")
m[2].metric("max activation", f"{page.max:.3g}")
m[3].metric("mean when active", f"{page.mean:.3g}")
if page.count == 0:
    st.warning(f"Feature {feature} never fires on this store's {len(text):,} tokens (dead here).")

st.subheader("Top activating examples")
st.markdown("".join(coloured_tokens(e.tokens, e.acts, page.max, e.centre) for e in page.top), unsafe_allow_html=True)
st.subheader("Examples from activation intervals")
for label, examples in page.intervals:
    with st.expander(f"activation {label}: {len(examples)} example(s)"):
        st.markdown("".join(coloured_tokens(e.tokens, e.acts, page.max, e.centre) for e in examples), unsafe_allow_html=True)

left, right = st.columns(2)
with left:
    log_density = np.log10(live["density"].to_numpy())
    density_fig = go.Figure(go.Histogram(x=log_density, nbinsx=50, name="all features"))
    if page.density > 0:
        density_fig.add_vline(x=float(np.log10(page.density)), line_color="red", annotation_text=f"feature {feature}")
    density_fig.update_layout(title="Feature density (log10 fraction of tokens), all live features",
                              xaxis_title="log10 density", yaxis_title="features")  # fmt: skip
    st.plotly_chart(density_fig)
with right:
    st.plotly_chart(go.Figure(go.Histogram(x=page.values, nbinsx=40)).update_layout(
        title=f"Non-zero activations of feature {feature}", xaxis_title="activation", yaxis_title="tokens"))  # fmt: skip

handle, reason = model_or_reason(store)
sae_model = load_sae_folder(str(sae_row["folder"]))[0] if sae_row["present"] else None
left, right = st.columns(2)
with left:
    st.subheader("Top and bottom logits")
    if handle is None or sae_model is None or not hasattr(handle.model, "W_U"):
        why = reason if handle is None else f"the SAE folder {sae_row['folder']} is gone" if sae_model is None else "the model has no unembedding"
        st.info(f"Logits need the model and the SAE weights: {why}")
    elif sae_model.d_in != handle.model.W_U.shape[0]:
        st.info(f"The SAE reads {sae_row['hook']} (d={sae_model.d_in}), not the residual stream: no direct logit effect.")
    else:
        with torch.no_grad():
            effect = (sae_model.W_dec[feature] @ handle.model.W_U).float()
        order = torch.argsort(effect, descending=True).tolist()
        picks = order[:10] + order[-10:][::-1]
        labels = [repr(s) for s in handle.token_strings(picks)]
        values = effect[picks].tolist()
        fig = go.Figure(go.Bar(x=values, y=labels, orientation="h", marker_color=["#2b8a3e"] * 10 + ["#c92a2a"] * 10))
        st.plotly_chart(fig.update_layout(title="W_dec[f] @ W_U: top 10 (green) and bottom 10 (red)", height=520)
                        .update_yaxes(autorange="reversed"))  # fmt: skip
with right:
    st.subheader("Most correlated features")
    corr = page.correlated
    if len(corr):
        corr = corr.assign(density=tables.stats.set_index("feature").loc[corr["other"], "density"].to_numpy())
        if sae_model is not None:
            w = torch.nn.functional.normalize(sae_model.W_dec.detach(), dim=1)
            corr["decoder_cosine"] = (w[corr["other"].to_numpy()] @ w[feature]).numpy()
        st.dataframe(corr, hide_index=True)
        st.caption(f"Pearson r of activations over the first {int(sae_row['corr_tokens']):,} tokens, among co-firing features.")
    else:
        st.caption("No co-firing features recorded for this feature.")

feature_links_section(store, name, feature)

st.subheader("Try new text")
if handle is None or sae_model is None:
    st.info(f"Running new text needs the model and the SAE: {reason or 'SAE folder missing'}")
else:
    typed = st.text_area("Text", "The river ran quietly past the old mill.")
    ids = handle.window_ids(typed, limit=512)
    hook = str(sae_row["hook"])
    acts = handle.run(torch.tensor([ids]), [hook])[hook][0].reshape(len(ids), -1).float()
    with torch.no_grad():
        dense = sae_model.feature_acts(acts)
    mine = dense[:, feature].tolist()
    st.markdown(coloured_tokens(handle.token_strings(ids), mine, max(page.max, max(mine), 1e-9)), unsafe_allow_html=True)
    strongest = dense.max(dim=0).values
    top = torch.topk(strongest, min(10, len(strongest)))
    st.dataframe(pd.DataFrame({"feature": top.indices.tolist(), "max activation in text": top.values.tolist()}), hide_index=True)

steering_section(handle, reason, sae_model, str(sae_row["hook"]), feature, page.max)
