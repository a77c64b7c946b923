"""The built-in English corpus: the Python Language Reference's topic texts, shipped with every Python.

`help("if")` reads its prose from the standard library module pydoc_data.topics, a dict of
the reference manual's sections (statements, expressions, the data model...) rendered as
plain text: English sentences with some grammar rules and short code examples. Documents are
those sections in sorted topic order. It exists so encoders trained on natural language
(all-MiniLM-L6-v2) can be captured on English without downloading anything; the `builtin`
corpus is Python source, which is what the zoo models were trained on.
"""

from __future__ import annotations

from workbench.errors import WorkbenchError

ENGLISH_SPEC = "builtin-english"


def english_documents() -> list[str]:
    """The reference manual's topic texts, one document per topic, in sorted topic order."""
    try:
        from pydoc_data.topics import topics
    except ImportError as err:
        raise WorkbenchError(f"the {ENGLISH_SPEC} corpus needs the standard library's pydoc_data module ({err})") from err
    documents = [topics[name] for name in sorted(topics) if topics[name].strip()]
    if not documents:
        raise WorkbenchError(f"pydoc_data.topics holds no text: the {ENGLISH_SPEC} corpus is empty")
    return documents
