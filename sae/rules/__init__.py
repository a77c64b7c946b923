"""Sparsifying rules, one per module: topk, mutual_choice, gba, jumprelu, matryoshka (training)
and the inference forms jumprelu and relu that SAELens folders use. Importing a module registers its rule
(sae.registry). The built-in ones are imported in the order `arch` lists them; every other
module of this package is imported after them, so a new rule is one new file here."""

import importlib
import pkgutil

from sae.rules.base import SparsityRule
from sae.rules.gba import GBARule
from sae.rules.jumprelu import JumpReLURule, JumpReLUTrainingRule
from sae.rules.mutual_choice import MutualChoiceRule
from sae.rules.relu import ReLURule
from sae.rules.topk import TopKRule

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["GBARule", "JumpReLURule", "JumpReLUTrainingRule", "MutualChoiceRule", "ReLURule", "SparsityRule", "TopKRule"]
