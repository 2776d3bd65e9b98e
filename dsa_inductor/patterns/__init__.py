"""The rule table: one module per idiom, one ``Rule`` subclass per module."""

from .gather_dequant import GatherDequantRule
from .mask_topk import MaskTopkRule

RULES = {rule.name: rule for rule in (MaskTopkRule, GatherDequantRule)}

__all__ = ["RULES"]
