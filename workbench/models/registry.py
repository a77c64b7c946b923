"""One entry point from a model spec (zoo name, MiniLM, a local folder, a TransformerLens name) to a ModelHandle."""

from __future__ import annotations

from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.models.handle import ModelHandle

MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "minilm")


def load_model(spec: str, device: str = "cpu") -> ModelHandle:
    """Load what `spec` names; unknown specs raise a WorkbenchError listing what works offline."""
    from workbench.models import zoo

    if spec in zoo.ZOO:
        return zoo.load_zoo_model(spec, device=device)
    if spec in MINILM_NAMES:
        from workbench.models.minilm import load_minilm

        return load_minilm(device=device)
    path = Path(spec).expanduser()
    if path.is_dir():
        from workbench.models.hf_local import load_hf_folder

        return load_hf_folder(path, device=device)
    if spec.startswith((".", "/", "~")) or path.suffix:
        raise WorkbenchError(f"model path '{spec}' does not exist or is not a folder")
    from workbench.models.tl_names import load_tl_name

    return load_tl_name(spec, device=device, offline_choices=sorted(zoo.ZOO) + [MINILM_NAMES[0]])
