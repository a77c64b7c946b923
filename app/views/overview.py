"""Overview: what the store holds (model, hooks, tokens, probes, SAEs), with links to the views."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app.store_access import missing_passes, require_store, sae_frame
from workbench.capture.probes.registry import PROBE_TABLES

PROBE_PAGES = {
    "lazy": ("views/lazy_neurons.py", "Lazy neurons"),
    "experts": ("views/super_experts.py", "Super experts"),
    "sinks": ("views/attention_sinks.py", "Attention sinks"),
    "routing": ("views/routing.py", "Routing"),
}

st.title("Sparse-feature workbench")
store = require_store()
info = store.info()
model = info["model"]
st.markdown(
    f"**Store** `{info['path']}` · **model** `{model['name']}` ({model['kind']}, {model['n_layers']} layers, "
    f"d_model {model['d_model']}) · **{info['tokens']:,} tokens** of {info['tokens_requested'] or '?':,} requested "
    f"in {info['batches']} batches, ctx {info['ctx']}"
)
if info["tokens_requested"] and info["tokens"] < info["tokens_requested"]:
    st.caption("A capture may still be writing: pages show the finished batches and catch up on rerun.")

st.subheader("Dense activations")
hooks = pd.DataFrame(
    [{"hook": h, "shape": str(m["shape"]), "dtype": m["dtype"]} for h, m in info["hooks"].items()],
    columns=["hook", "shape", "dtype"],
)
if len(hooks):
    st.dataframe(hooks, hide_index=True)
else:
    st.caption("No dense hooks stored (capture with --hooks).")

st.subheader("Phenomena")
for probe, table in PROBE_TABLES.items():
    page, title = PROBE_PAGES[probe]
    held = table in info["probe_tables"]
    cols = st.columns([1, 3])
    with cols[0]:
        st.page_link(page, label=title)
    cols[1].caption("captured" if held else f"not captured: add `--probes {probe}` to the capture")

st.subheader("Sparse autoencoders")
saes = sae_frame(store)
if len(saes):
    st.dataframe(saes[["name", "rule", "hook", "d_sae", "l0", "fvu", "dead_fraction", "tokens", "folder"]], hide_index=True)
    st.page_link("views/sae_features.py", label="SAE features: one page per feature")
    st.page_link("views/sae_comparison.py", label="SAE comparison: FVU, L0, dead fraction, densities")
else:
    st.caption(f"No feature pass yet: `workbench features SAE_DIR --store {info['path']}` after training an SAE.")
for folder in missing_passes(store):
    st.warning(f"SAE {folder} has no feature pass here: run `workbench features {folder} --store {info['path']}`")
