"""The workbench app: `workbench app --store PATH` runs `streamlit run app/main.py`.

One entry script, one page per view (app/views/), navigation in the sidebar. The store path
and SAE folders arrive in the environment (see app/store_access.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `streamlit run` puts app/ on the path, not the repository
    sys.path.insert(0, str(ROOT))

PAGES = Path(__file__).parent / "views"  # not pages/: that name turns on streamlit's legacy auto-navigation

from app.store_access import store_paths  # noqa: E402  (needs the repository on sys.path)

st.set_page_config(page_title="Sparse-feature workbench", layout="wide")
if len(store_paths()) > 1:  # one store per model: the demo serves several
    st.sidebar.selectbox("Store", store_paths(), key="store", format_func=lambda p: Path(p).name)
navigation = st.navigation(
    [
        st.Page(PAGES / "overview.py", title="Overview", default=True),
        st.Page(PAGES / "lazy_neurons.py", title="Lazy neurons"),
        st.Page(PAGES / "super_experts.py", title="Super experts"),
        st.Page(PAGES / "attention_sinks.py", title="Attention sinks"),
        st.Page(PAGES / "routing.py", title="Routing"),
        st.Page(PAGES / "sae_features.py", title="SAE features"),
        st.Page(PAGES / "sae_comparison.py", title="SAE comparison"),
    ]
)
navigation.run()
