"""Graph normalizations applied both to traced search patterns and to the graphs we match.

Traced patterns only match graphs that look like Inductor's own post-grad graphs
(``../shared/research/inductor_notes.md``, "Traced pattern != graph Inductor actually has"):

* ``view_to_reshape``: post-grad graphs hold ``aten.reshape``, ``make_fx`` emits ``aten.view``;
* ``constant_fold_uniform_value``: ``masked_fill(m, -inf)`` traces to ``aten.scalar_tensor`` but the
  joint-graph pass has already turned it into ``aten.full([], -inf)``.

Two further rewrites make equivalent spellings of one broadcast look alike.  Both keep every value of the
graph exactly as it was:

* ``unsqueeze(x, d)`` with ``d < 0`` becomes ``unsqueeze(x, d + x.dim() + 1)``;
* a leading ``unsqueeze(x, 0)`` feeding a broadcasting comparison or logical op is dropped when the other
  operand has at least as many dims, so ``arange(N)[None, :] >= row_starts[:, None]`` and
  ``arange(N) >= row_starts[:, None]`` become one graph.
"""

from __future__ import annotations

import torch
from torch._inductor.fx_passes.joint_graph import constant_fold_uniform_value
from torch._inductor.fx_passes.post_grad import view_to_reshape
from torch._inductor.pattern_matcher import fwd_only

aten = torch.ops.aten

_BROADCAST_OPS = {
    aten.ge.Tensor, aten.gt.Tensor, aten.le.Tensor, aten.lt.Tensor, aten.eq.Tensor, aten.ne.Tensor,
    aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.logical_and.default, aten.logical_or.default,
}


def _rank(node):
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


def canonicalize_broadcasts(graph: torch.fx.Graph) -> int:
    """Apply the two broadcast rewrites in place; returns how many nodes changed."""
    changed = 0
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is aten.unsqueeze.default and isinstance(node.args[1], int) and node.args[1] < 0:
            rank = _rank(node.args[0])
            if rank is not None:
                node.args = (node.args[0], node.args[1] + rank + 1)
                changed += 1
        elif node.target in _BROADCAST_OPS and len(node.args) == 2:
            args = list(node.args)
            for i in (0, 1):
                a, other = args[i], args[1 - i]
                if (isinstance(a, torch.fx.Node) and a.target is aten.unsqueeze.default and a.args[1] == 0
                        and _rank(a) is not None and _rank(other) is not None and _rank(other) >= _rank(a)):
                    args[i] = a.args[0]
                    changed += 1
            node.args = tuple(args)
    if changed:
        graph.eliminate_dead_code()
    return changed


def trace_fn(fn, args, **kwargs):
    """``fwd_only`` plus the normalizations above: the trace function of every dsa_inductor pattern.

    Takes ``**kwargs`` so it accepts torch 2.13's extra ``get_decomp_fn=``.
    """
    gm = fwd_only(fn, args, **kwargs)
    view_to_reshape(gm)
    constant_fold_uniform_value(gm)
    canonicalize_broadcasts(gm.graph)
    gm.recompile()
    return gm
