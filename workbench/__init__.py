"""Interpretability workbench: capture activations, train sparse autoencoders, browse."""

from workbench.errors import WorkbenchError
from workbench.store.reader import Store

__all__ = ["Store", "WorkbenchError"]
