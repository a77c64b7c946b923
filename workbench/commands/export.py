"""`workbench export-neuronpedia SAE_DIR --store S --out DIR`: an SAE's feature dashboards as
Neuronpedia's upload JSON, and the SAE listed in the local release file (workbench/releases.py)."""

from __future__ import annotations

import typer

from workbench.store.reader import Store


def export_neuronpedia_command(
    sae: str = typer.Argument(..., help="SAE folder (or release/id of a local release file) passed over --store"),
    store: str = typer.Option(..., "--store", help="store holding the SAE's feature pass (`workbench features`)"),
    out: str = typer.Option(..., "--out", help="folder for the batch-<n>.json files"),
    name: str = typer.Option(None, "--name", help="name of the SAE in the store (default: its folder name)"),
    model_id: str = typer.Option(None, "--model-id", help="Neuronpedia model id (default: the store's model)"),
    sae_set: str = typer.Option(None, "--sae-set", help="Neuronpedia SAE set (default: <layer>-<name>)"),
    release: str = typer.Option(None, "--release", help="local release to list the SAE in, so load_sae('RELEASE/ID') finds it "
                                "(default: <model>-workbench); the file is $WORKBENCH_RELEASES or ~/.cache/workbench/pretrained_saes.yaml"),
    features_per_file: int = typer.Option(128, "--features-per-file", help="features per batch file"),
) -> None:
    """Write every feature's dashboard (activation examples in quantile bins, top and bottom logits,
    histograms, correlated features, frac_nonzero) as Neuronpedia feature JSON."""
    from workbench.analysis.neuronpedia_export import export_neuronpedia
    from workbench.releases import register_release

    opened = Store.open(store)
    done = export_neuronpedia(opened, sae, out, name=name, model_id=model_id, sae_set=sae_set, features_per_file=features_per_file)
    release = release or f"{opened.model_name}-workbench"
    path = register_release(release, done.name, done.folder, opened.model_name, l0=done.l0, variance_explained=1 - done.fvu,
                            neuronpedia=f"{done.model_id}/{done.sae_set}")  # fmt: skip
    note = "" if done.logits else " (no logits: the store's model does not load here or has no unembedding at the SAE's width)"
    print(f"{done.features} features in {len(done.files)} file(s) -> {done.out}{note}; listed as {release}/{done.name} in {path}")
