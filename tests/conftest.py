"""Shared fixtures: the shipped zoo models, loaded once per test session."""

from __future__ import annotations

import pytest

from workbench.models.handle import ModelHandle
from workbench.models.registry import load_model


@pytest.fixture(scope="session")
def tiny_relu() -> ModelHandle:
    return load_model("tiny-relu")


@pytest.fixture(scope="session")
def tiny_moe() -> ModelHandle:
    return load_model("tiny-moe")
