"""Sparsifying rules, one per module: topk, mutual_choice, gba, jumprelu, matryoshka (training)
and the inference forms jumprelu and relu that SAELens folders use. Importing a module registers its rule
(sae.registry). The built-in ones are imported in the order `arch` lists them (BUILT_IN_ORDER,
by name, so no import sorter can reorder them); every other module of this package is imported
after them, so a new rule is one new file here."""

import importlib
import pkgutil

#: The built-in training rules in the order `arch` lists them; they register first.
BUILT_IN_ORDER = ("topk", "mutual_choice", "gba")

for _module in (*BUILT_IN_ORDER, *(m.name for m in pkgutil.iter_modules(__path__))):
    importlib.import_module(f"{__name__}.{_module}")

from sae.rules.base import SparsityRule  # noqa: E402 - after the ordered registration above
from sae.rules.gba import GBARule  # noqa: E402
from sae.rules.jumprelu import JumpReLURule, JumpReLUTrainingRule  # noqa: E402
from sae.rules.mutual_choice import MutualChoiceRule  # noqa: E402
from sae.rules.relu import ReLURule  # noqa: E402
from sae.rules.topk import TopKRule  # noqa: E402

__all__ = ["GBARule", "JumpReLURule", "JumpReLUTrainingRule", "MutualChoiceRule", "ReLURule", "SparsityRule", "TopKRule"]
