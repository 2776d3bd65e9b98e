"""Graph normalizations applied both to traced search patterns and to the graphs we match.

Traced patterns only match graphs that look like Inductor's own post-grad graphs
(``../shared/research/inductor_notes.md``, "Traced pattern != graph Inductor actually has"):

* ``view_to_reshape``: post-grad graphs hold ``aten.reshape``, ``make_fx`` emits ``aten.view``;
* ``constant_fold_uniform_value``: ``masked_fill(m, -inf)`` traces to ``aten.scalar_tensor`` but the
  joint-graph pass has already turned it into ``aten.full([], -inf)``.

Two further rewrites make equivalent spellings of one broadcast look alike.  Both keep every value of the
graph exactly as it was:

* ``unsqueeze(x, d)`` with ``d < 0`` becomes ``unsqueeze(x, d + x.dim() + 1)``;
* a leading ``unsqueeze(x, 0)``, or a reshape of a 1-d ``x`` to ``[1, ..., 1, n]``, feeding a broadcasting
  comparison or logical op is dropped when the other operand has at least as many dims, so
  ``arange(N)[None, :] >= row_starts[:, None]``, ``arange(N).view(1, 1, -1) >= row_starts[..., None]`` and
  ``arange(N) >= row_starts[:, None]`` become one graph.
"""

from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true
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


def _leading_ones(node) -> bool:
    """``node`` only puts size-1 dims in front of its input: ``unsqueeze(x, 0)``, or a reshape of a 1-d ``x``
    to ``[1, ..., 1, n]`` (``torch.arange(T).view(1, 1, -1)``, DeepSeek-V4's indexer)."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return False
    if node.target is aten.unsqueeze.default:
        return node.args[1] == 0
    if node.target is aten.reshape.default and _rank(node.args[0]) == 1:
        val, src = node.meta.get("val"), node.args[0].meta.get("val")
        return val is not None and all(statically_known_true(d == 1) for d in val.shape[:-1]) and \
            statically_known_true(val.shape[-1] == src.shape[0])
    return False


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
                if (_leading_ones(a) and _rank(a) is not None and _rank(other) is not None
                        and _rank(other) >= _rank(a)):
                    args[i] = a.args[0]
                    changed += 1
            node.args = tuple(args)
    if changed:
        graph.eliminate_dead_code()
    return changed


def _squeezed0(node):
    """``a`` for ``node = squeeze(a, 0)`` (``squeeze.dim`` or ``squeeze.dims [0]``) of a rank-3 ``a``."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return None
    if node.target is aten.squeeze.dim and node.args[1] == 0 or \
            node.target is aten.squeeze.dims and list(node.args[1]) == [0]:
        return node.args[0] if _rank(node.args[0]) == 3 else None
    return None


def mm_to_bmm(graph: torch.fx.Graph) -> list:
    """Undo Inductor's GPU-only joint-graph rewrite ``bmm_to_mm`` (``joint_graph.py``): for batch 1,
    ``unsqueeze(mm(squeeze(a, 0), squeeze(b, 0)), 0)`` -> ``bmm(a, b)``, the form our patterns are traced
    in (on the CPU) and the form the same code takes for any other batch.  Values are unchanged.  Returns
    the bmm nodes made, for ``bmm_to_mm`` to put back the ones no rule consumed."""
    made = []
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.unsqueeze.default or node.args[1] != 0:
            continue
        mm = node.args[0]
        if not isinstance(mm, torch.fx.Node) or mm.target is not aten.mm.default or len(mm.users) != 1:
            continue
        a, b = _squeezed0(mm.args[0]), _squeezed0(mm.args[1])
        if a is None or b is None or "val" not in node.meta:
            continue
        with graph.inserting_before(node):
            bmm = graph.call_function(aten.bmm.default, (a, b))
        bmm.meta.update(node.meta)
        node.replace_all_uses_with(bmm)
        for dead in (node, mm, *mm.args):
            if not dead.users:
                graph.erase_node(dead)
        made.append(bmm)
    return made


def bmm_to_mm(graph: torch.fx.Graph, made: list) -> None:
    """Put back Inductor's batch-1 ``mm`` form for the ``mm_to_bmm`` nodes still in the graph."""
    alive = set(graph.nodes)
    for bmm in made:
        if bmm not in alive or bmm.target is not aten.bmm.default:
            continue
        a, b = bmm.args
        with graph.inserting_before(bmm):
            sa = graph.call_function(aten.squeeze.dim, (a, 0))
            sb = graph.call_function(aten.squeeze.dim, (b, 0))
            mm = graph.call_function(aten.mm.default, (sa, sb))
            out = graph.call_function(aten.unsqueeze.default, (mm, 0))
        sa.meta["val"], sb.meta["val"] = a.meta["val"].squeeze(0), b.meta["val"].squeeze(0)
        mm.meta["val"] = torch.mm(sa.meta["val"], sb.meta["val"])
        out.meta.update(bmm.meta)
        bmm.replace_all_uses_with(out)
        graph.erase_node(bmm)


def drop_bmm_operand_clones(graph: torch.fx.Graph, bmms) -> list:
    """``reshape(clone(x))`` -> ``reshape(x)`` for the operands of ``bmms``.

    ``torch.matmul`` of a 4-d by a broadcast 4-d tensor decomposes to ``expand`` -> ``reshape`` -> ``bmm``, and
    ``einsum`` to ``unsqueeze`` / ``permute`` -> ``reshape`` -> ``bmm``.  When the operand is not contiguous
    (DeepSeek-V4's indexer transposes q from ``[B, H, S, D]`` to ``[B, S, H, D]``), the decomposition puts a
    ``clone(memory_format=contiguous_format)`` before the reshape; a pattern traced on contiguous inputs has
    none.  ``reshape`` copies when it must, so values are unchanged.  Returns what
    ``restore_bmm_operand_clones`` needs to put back the clones no rule consumed."""
    dropped = []
    for bmm in bmms:
        for rs in bmm.args[:2]:
            if not (isinstance(rs, torch.fx.Node) and rs.target is aten.reshape.default):
                continue
            clone = rs.args[0]
            if not (isinstance(clone, torch.fx.Node) and clone.target is aten.clone.default
                    and len(clone.users) == 1 and clone.kwargs.get("memory_format") in (None, torch.contiguous_format)
                    and isinstance(clone.args[0], torch.fx.Node)):
                continue
            rs.replace_input_with(clone, clone.args[0])
            dropped.append((rs, clone.args[0], dict(clone.kwargs), dict(clone.meta)))
            graph.erase_node(clone)
    return dropped


def restore_bmm_operand_clones(graph: torch.fx.Graph, dropped: list) -> None:
    """Put back the clones ``drop_bmm_operand_clones`` removed, where their reshape is still in the graph."""
    for rs, src, kwargs, meta in dropped:
        if rs._erased or rs.args[0] is not src:
            continue
        with graph.inserting_before(rs):
            clone = graph.call_function(aten.clone.default, (src,), kwargs)
        clone.meta.update(meta)
        rs.replace_input_with(src, clone)


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


def trace_joint(fn, args, **kwargs):
    """``trace_fn`` plus Inductor's joint-graph patterns (they fold the permute pairs of the
    einsum decomposition, as they did in the graph we match), with their GPU-only batch-1 ``bmm_to_mm``
    undone as the pass manager undoes it in that graph (``mm_to_bmm``): an exact re-trace on CUDA fake
    tensors would otherwise hold ``mm`` where the graph holds ``bmm``."""
    from torch._inductor.fx_passes import joint_graph

    gm = trace_fn(fn, args, **kwargs)
    joint_graph.lazy_init()
    joint_graph.early_patterns.apply(gm.graph)  # pointless_permute_pair, pointless_view, ...
    for pm in joint_graph.pass_patterns:
        pm.apply(gm.graph)
    mm_to_bmm(gm.graph)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm
