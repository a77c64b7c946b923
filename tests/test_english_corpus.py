"""The `builtin-english` corpus: the Python reference manual's prose, read offline, English enough for MiniLM's demo."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from pydoc_data.topics import topics

from workbench.capture.texts import load_corpus
from workbench.commands.demo import capture_steps
from workbench.models.english_corpus import ENGLISH_SPEC


def test_builtin_english_is_the_reference_manual_in_topic_order():
    corpus = load_corpus(ENGLISH_SPEC)
    assert corpus.spec == ENGLISH_SPEC
    assert corpus.documents == [topics[name] for name in sorted(topics)]
    assert load_corpus(ENGLISH_SPEC).fingerprint == corpus.fingerprint
    words = Counter(w.lower() for doc in corpus.documents for w in doc.split() if w.isalpha())
    assert words.most_common(1)[0][0] == "the"  # English prose, not code
    assert sum(words.values()) > 40_000  # enough for the demo's MiniLM capture (a few thousand tokens)


def test_the_demo_captures_minilm_on_english_and_the_zoo_models_on_python():
    data = {step[2]: step[step.index("--data") + 1] for step in capture_steps(Path("demo"), 1600) if step[0] == "capture"}
    assert data == {"tiny-relu": "builtin", "tiny-moe": "builtin", "all-MiniLM-L6-v2": ENGLISH_SPEC}
