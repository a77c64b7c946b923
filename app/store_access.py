"""How every page reaches the store, the models and the SAEs: cached, and never a traceback.

The store path and SAE folders come from the environment (`workbench app` sets them), so the
same script runs under `streamlit run` and under streamlit's AppTest. Results are cached
with a key that includes the store's token count and tables, so a capture still writing to
the store shows up on the next rerun while a finished one is computed once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import streamlit as st

from workbench.errors import WorkbenchError
from workbench.store.reader import Store

STORE_ENV = "WORKBENCH_STORE"
SAES_ENV = "WORKBENCH_SAES"
T = TypeVar("T")


def store_paths() -> list[str]:
    """Stores given with `workbench app --store PATH [--store PATH ...]` (os.pathsep-separated in the env)."""
    return [p for p in os.environ.get(STORE_ENV, "").split(os.pathsep) if p]


def store_path() -> str:
    """The store chosen in the sidebar (app/main.py), else the first one given."""
    paths = store_paths()
    chosen = st.session_state.get("store")
    return chosen if chosen in paths else (paths[0] if paths else "")


def sae_dirs() -> list[Path]:
    """SAE folders given with `workbench app --sae DIR` (os.pathsep-separated in the env)."""
    return [Path(p) for p in os.environ.get(SAES_ENV, "").split(os.pathsep) if p]


def capture_hint(path: str) -> str:
    target = path or "STORE"
    return (
        f"`workbench capture --model tiny-relu --data builtin --hooks blocks.2.hook_resid_post --probes all "
        f"--tokens 200000 --store {target}` then `workbench app --store {target}`"
    )


def require_store() -> Store:
    """The open store, or a page that says which command fills one (and stops the script)."""
    path = store_path()
    if not path:
        st.info(f"No store given. Capture one, then start the app on it: {capture_hint('')}")
        st.stop()
    try:
        store = Store.open(path)
    except WorkbenchError as err:
        st.info(f"{err}. Fill it with {capture_hint(path)}")
        st.stop()
    if store.n_tokens() == 0:
        st.info(f"Store {path} holds no finished batch yet (a capture may be starting). Run {capture_hint(path)}")
        st.stop()
    return store


def version(store: Store) -> tuple[int, tuple[tuple[str, tuple[str, ...]], ...]]:
    """Changes when a batch or a derived table lands, a rewritten table included (its files
    are new): the cache key of everything derived."""
    info, views = store.info(), store.views()
    return info["tokens"], tuple((name, tuple(views[name])) for name in info["tables"])


def cached(fn: Callable[..., T], store: Store, *args: Any) -> T:
    """fn(store, *args), computed once per store version and arguments."""
    return _cached_call(fn, f"{fn.__module__}.{fn.__qualname__}", str(store.root), version(store), args)


@st.cache_data(show_spinner="reading the store...", max_entries=256)
def _cached_call(_fn: Callable[..., Any], name: str, root: str, store_version: tuple, args: tuple) -> Any:
    return _fn(Store.open(root), *args)


def guarded(fn: Callable[..., T], store: Store, *args: Any) -> T:
    """cached(), but a missing probe or bad input becomes an info box and the page stops."""
    try:
        return cached(fn, store, *args)
    except WorkbenchError as err:
        st.info(str(err))
        st.stop()
        raise  # unreachable: st.stop raises


@st.cache_resource(show_spinner="loading the model...")
def _model(name: str) -> Any:
    from workbench.models.registry import load_model

    try:
        return load_model(name)
    except (WorkbenchError, OSError, ValueError) as err:
        return str(err)


def model_or_reason(store: Store) -> tuple[Any, str]:
    """(ModelHandle, "") when the store's model loads here, else (None, why not)."""
    got = _model(store.model_name)
    return (None, got) if isinstance(got, str) else (got, "")


@st.cache_resource(show_spinner="loading the SAE...")
def load_sae_folder(folder: str) -> Any:
    from sae.io import load_sae

    return load_sae(folder)


@st.cache_resource(show_spinner="loading tokens...", max_entries=4)
def token_text(root: str, store_version: tuple) -> Any:
    from workbench.analysis.feature_page import TokenText

    return TokenText(Store.open(root))


@st.cache_resource(max_entries=16)
def feature_tables(root: str, name: str, store_version: tuple) -> Any:
    from workbench.analysis.feature_page import FeatureTables

    return FeatureTables(Store.open(root), name)


def sae_frame(store: Store) -> pd.DataFrame:
    from workbench.analysis.feature_page import list_saes

    return cached(list_saes, store)


def missing_passes(store: Store) -> list[Path]:
    """SAE folders given to the app that have no feature pass in this store yet."""
    done = {Path(f).resolve() for f in sae_frame(store)["folder"]}
    return [d for d in sae_dirs() if d.resolve() not in done]


def sequence_tokens(store: Store, seq: int) -> pd.DataFrame:
    """token_index, pos, token_id, token of one stored sequence (window), in order."""
    return store.df("SELECT token_index, pos, token_id, token FROM tokens WHERE seq = ? ORDER BY pos", [seq])


def sequence_count(store: Store) -> int:
    return int(store.df("SELECT max(seq) + 1 AS n FROM tokens")["n"][0])
