"""Fused ops: one module per op, each with its schema, CPU path and Triton kernels."""

from . import masked_topk

__all__ = ["masked_topk"]
