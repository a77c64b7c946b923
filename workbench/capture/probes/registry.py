"""Probe names the CLI accepts, and building the probes a capture asked for."""

from __future__ import annotations

from typing import TYPE_CHECKING

from workbench.capture.probe import Probe
from workbench.capture.probes.attention_sinks import AttentionSinkProbe
from workbench.capture.probes.lazy_neurons import LazyNeuronProbe
from workbench.capture.probes.routing import RoutingProbe
from workbench.capture.probes.super_experts import SuperExpertProbe
from workbench.errors import WorkbenchError
from workbench.models.handle import ModelHandle

if TYPE_CHECKING:
    from workbench.store.reader import Store

PROBES: dict[str, type[Probe]] = {
    "lazy": LazyNeuronProbe,
    "experts": SuperExpertProbe,
    "sinks": AttentionSinkProbe,
    "routing": RoutingProbe,
}
PROBE_NAMES: tuple[str, ...] = tuple(PROBES)


def make_probes(names: list[str], handle: ModelHandle) -> list[Probe]:
    """Probes for the names given; "all" means every probe that applies to this model.

    A probe named explicitly that cannot run on the model is an error, not a silent skip.
    """
    wanted: list[str] = []
    explicit: set[str] = set()
    for raw in names:
        name = raw.strip().lower()
        if not name:
            continue
        if name == "all":
            wanted.extend(n for n in PROBE_NAMES if n not in wanted)
        elif name in PROBES:
            explicit.add(name)
            if name not in wanted:
                wanted.append(name)
        else:
            raise WorkbenchError(f"unknown probe '{raw}'; choose from {', '.join(PROBE_NAMES)} or all")
    probes: list[Probe] = []
    for name in wanted:
        cls = PROBES[name]
        reason = cls.unavailable(handle)  # type: ignore[attr-defined]
        if reason is None:
            probes.append(cls(handle))  # type: ignore[call-arg]
        elif name in explicit:
            raise WorkbenchError(f"probe '{name}' cannot run: {reason}")
    return probes


# The table each probe always writes: its presence in a store means the probe was captured.
PROBE_TABLES: dict[str, str] = {
    "lazy": "lazy_neuron_counts",
    "experts": "expert_max",
    "sinks": "sink_attention",
    "routing": "routing_choices",
}


def require_probe(store: Store, probe: str) -> None:
    """Raise one line saying how to capture the probe when the store lacks its rows."""
    if PROBE_TABLES[probe] in store.info()["probe_tables"]:
        return
    needs = " (it needs a model with mixture-of-experts layers)" if probe in ("experts", "routing") else ""
    raise WorkbenchError(
        f"store {store.root} (model {store.model_name}) has no '{probe}' probe rows: "
        f"capture with --probes {probe}{needs}"
    )
