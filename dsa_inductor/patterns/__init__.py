"""The rule table: one module per idiom, one ``Rule`` subclass per module."""

from .causal_sdpa import CausalSdpaRule
from .gather_dequant import GatherDequantRule
from .index_score import IndexScoreRule
from .mask_topk import MaskTopkRule
from .reroll import RerollRule
from .sparse_attention import SparseAttentionRule
from .windowed_attention import WindowedAttentionRule
from .windowed_softmax import WindowedSoftmaxRule

# The pass manager runs the enabled rules in this order, in one pass over each graph.  reroll first: the
# batched gathers it creates are then seen by the other rules.  sparse_attention after mask_topk: it must see
# masked_topk to know the selected indices are distinct.  windowed_attention right after windowed_softmax: it
# folds the windowed_softmax ops that one inserts, with their q @ k^T and @ v, into one op.  causal_sdpa after
# mask_topk and sparse_attention: once the short-sequence shortcut has made the index mask constant, the fused
# SDPA's bias is the plain causal mask.
RULES = {rule.name: rule for rule in (RerollRule, MaskTopkRule, SparseAttentionRule, CausalSdpaRule,
                                      GatherDequantRule, WindowedSoftmaxRule, WindowedAttentionRule)}
RULES[IndexScoreRule.name] = IndexScoreRule

__all__ = ["RULES"]
