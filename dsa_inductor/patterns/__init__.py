"""The rule table: one module per idiom, one ``Rule`` subclass per module."""

from .gather_dequant import GatherDequantRule
from .index_score import IndexScoreRule
from .mask_topk import MaskTopkRule
from .reroll import RerollRule
from .windowed_softmax import WindowedSoftmaxRule

# reroll first: the batched gathers it creates are then seen by the other rules
RULES = {rule.name: rule for rule in (RerollRule, MaskTopkRule, GatherDequantRule, WindowedSoftmaxRule)}
RULES[IndexScoreRule.name] = IndexScoreRule

__all__ = ["RULES"]
