"""The feature page's section "Where this feature meets the phenomena": the share of its firings
on sink and massive-activation tokens against all tokens, the experts its top tokens are routed
to against their load, and the MLP neurons whose output direction its decoder row is closest to
(workbench.analysis.links; `workbench links` writes the tables)."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st

from app.store_access import cached
from workbench.analysis.link_reader import feature_links, links_state
from workbench.store.reader import Store


def _share_metric(column: st.delta_generator.DeltaGenerator, label: str, share: float | None, base: float | None) -> None:
    if share is None or pd.isna(share) or base is None or pd.isna(base):
        column.metric(label, "not captured")
    else:
        lift = f"{share / base:.1f}x all tokens" if base > 0 else "no such token in the store"
        column.metric(label, f"{share:.1%}", lift, delta_color="off", delta_arrow="off")


def _experts_figure(experts: pd.DataFrame, feature: int) -> None:
    """Per MoE layer: the share of the feature's routing slots each expert got, beside its load."""
    shown = experts.melt(id_vars=["layer", "expert"], value_vars=["share", "load_share"], var_name="of", value_name="slots share")
    shown["of"] = shown["of"].map({"share": f"feature {feature}'s top tokens", "load_share": "all tokens (load)"})
    fig = px.bar(shown, x="expert", y="slots share", color="of", barmode="group", facet_col="layer",
                 title="Experts the top-activating tokens are routed to, against each expert's load")  # fmt: skip
    st.plotly_chart(fig.update_xaxes(dtick=1, title=None))


def feature_links_section(store: Store, name: str, feature: int) -> None:
    """Draw the section for one feature of SAE `name`, or say which command makes its tables."""
    st.subheader("Where this feature meets the phenomena")
    state = cached(links_state, store, name)
    if state == "missing":
        st.info(f"No links for SAE '{name}' yet: run `workbench links --store {store.root} --sae {name}`.")
        return
    if state == "stale":
        st.warning(f"The links of '{name}' predate its last feature pass: rerun `workbench links --store {store.root} --sae {name}`.")
    links = cached(feature_links, store, name, feature)
    summary = links.summary
    m = st.columns(3)
    _share_metric(m[0], "firings on attention-sink tokens", summary.get("sink_share"), summary.get("sink_base"))
    _share_metric(m[1], "firings on massive-activation tokens", summary.get("massive_share"), summary.get("massive_base"))
    entropy, pos0 = summary.get("top_token_entropy"), summary.get("top_pos0_share")
    m[2].metric("distinct tokens among top examples", f"{int(summary.get('distinct_top_tokens', 0))} of {int(summary.get('top_tokens', 0))}",
                None if entropy is None or pd.isna(entropy) else f"entropy {entropy:.2f} nats, {pos0:.0%} at position 0",
                delta_color="off", delta_arrow="off")  # fmt: skip
    if len(links.experts):
        _experts_figure(links.experts, feature)
    else:
        st.caption("No routing rows: expert links need an MoE model captured with --probes routing.")
    if len(links.neurons):
        st.markdown("**MLP neurons whose output direction (W_out row) is closest to the decoder row**")
        st.dataframe(links.neurons.drop(columns="feature"), hide_index=True)
    else:
        st.caption(f"No neuron links: {links.neuron_note or 'no MLP neuron is recorded for this feature'}.")
