"""Shared fixtures: the shipped zoo models, loaded once per test session.

Triton kernels run on the CPU only through its interpreter, which must be switched on before
any kernel module is imported (a kernel decorated without it cannot be interpreted later).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from workbench.models.handle import ModelHandle  # noqa: E402
from workbench.models.registry import load_model  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny matrices: intra-op threads only add overhead (a lot on a shared 2-core box)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_relu() -> ModelHandle:
    return load_model("tiny-relu")


@pytest.fixture(scope="session")
def tiny_moe() -> ModelHandle:
    return load_model("tiny-moe")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Drop the app's cached DuckDB connections before exit (else nanobind reports them as leaks)."""
    import gc
    import logging

    import streamlit as st

    logging.disable(logging.WARNING)  # clearing outside a running app logs a warning
    st.cache_resource.clear()
    st.cache_data.clear()
    gc.collect()
