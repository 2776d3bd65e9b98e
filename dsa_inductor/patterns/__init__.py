"""The rule table: one module per idiom, one ``Rule`` subclass per module."""

from .mask_topk import MaskTopkRule

RULES = {rule.name: rule for rule in (MaskTopkRule,)}

__all__ = ["RULES"]
