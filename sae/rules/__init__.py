"""Sparsifying rules, one per module: topk, mutual_choice, gba (training) and the inference
forms relu and jumprelu that SAELens folders use."""

from sae.rules.base import SparsityRule
from sae.rules.gba import GBARule
from sae.rules.jumprelu import JumpReLURule
from sae.rules.mutual_choice import MutualChoiceRule
from sae.rules.relu import ReLURule
from sae.rules.topk import TopKRule

__all__ = ["GBARule", "JumpReLURule", "MutualChoiceRule", "ReLURule", "SparsityRule", "TopKRule"]
