"""Fused ops: one module per op, each with its schema, CPU path and Triton kernels.

Every op module has a module-level ``VERIFY`` flag (set by ``register_dsa_passes(verify=...)`` through
``set_verify``): when true its CUDA path also runs the op's plain-torch definition and raises on a
difference.  The check of a rewrite against the eager subgraph it replaced is ``dsa_inductor.verify``.
"""

from . import gather_dequant, masked_topk, windowed_softmax
from . import index_score
from . import sparse_attention
from . import windowed_attention

OPS = (masked_topk, gather_dequant, windowed_softmax)
OPS += (index_score, sparse_attention, windowed_attention)


def set_verify(flag: bool) -> None:
    for module in OPS:
        module.VERIFY = bool(flag)


__all__ = ["masked_topk", "gather_dequant", "windowed_softmax", "OPS", "set_verify"]
__all__ += ["index_score", "sparse_attention", "windowed_attention"]
