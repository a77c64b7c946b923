"""Sparsifying rules, one per module: topk, mutual_choice, gba (training) and the inference
forms jumprelu and relu that SAELens folders use. Importing a module registers its rule
(sae.registry); the imports run in the order the rules are listed in (`arch` choices)."""

from sae.rules.base import SparsityRule
from sae.rules.topk import TopKRule
from sae.rules.mutual_choice import MutualChoiceRule
from sae.rules.gba import GBARule
from sae.rules.jumprelu import JumpReLURule
from sae.rules.relu import ReLURule

__all__ = ["GBARule", "JumpReLURule", "MutualChoiceRule", "ReLURule", "SparsityRule", "TopKRule"]
