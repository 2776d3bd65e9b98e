"""The rule table: one module per idiom, one ``Rule`` subclass per module."""

from .gather_dequant import GatherDequantRule
from .index_score import IndexScoreRule
from .mask_topk import MaskTopkRule
from .sparse_attention import SparseAttentionRule
from .windowed_softmax import WindowedSoftmaxRule

RULES = {rule.name: rule for rule in (MaskTopkRule, SparseAttentionRule, GatherDequantRule, WindowedSoftmaxRule)}
RULES[IndexScoreRule.name] = IndexScoreRule

__all__ = ["RULES"]
