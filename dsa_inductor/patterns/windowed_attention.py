"""Rule ``windowed_attention``: attention over per-row key windows -> ``dsa_inductor::windowed_attention``.

The idiom is attention whose mask is a window of keys per query: DeepSeek-V4's sliding window over the last
128 keys (``(kv > q - w) & (kv <= q)``), DSA prefill's explicit ``[ks, ke)`` offsets from ``cu_seqlens``,
or plain causal attention written with an ``arange`` comparison::

    scores = (q @ k.transpose(-1, -2)) * scale          # or / math.sqrt(d), einsum; batch and head dims
    scores = scores.masked_fill(~keep, float("-inf"))    # or .float() first
    probs = scores.softmax(-1)                           # or softmax(..., dtype=torch.float32).to(q.dtype)
    out = probs @ v

The rule ``windowed_softmax`` (run first, same graph pass; see ``patterns/__init__.py``) has already turned
the masked softmax into ``dsa_inductor::windowed_softmax(scores, row_starts, row_ends, None, out_dtype)``.
This rule walks from each such op node (its anchor), rather than matching traced variants, because the
dense product around the softmax takes many post-grad shapes (``mm`` for 2-d inputs; expand / reshape /
``clone`` / ``bmm`` / reshape for batched ``matmul``; permutes and 5-d reshapes for ``einsum``):

* upward, the softmax input must be the ``bmm``/``mm`` of ``q`` and a transposed ``k`` through views that
  keep the element order (reshape, squeeze/unsqueeze, permutes of size-1 dims, no-op expands), exact upcasts
  to fp32, and at most one product with (or division by) a Python number: the scale;
* downward, the probabilities' only consumer must be (through such views and ``convert_element_type``) the
  left operand of a ``bmm``/``mm``, whose right operand is ``v``;
* no intermediate (scores, scaled scores, probabilities) may have another user.

The chain is then one ``windowed_attention(q, k, v, row_starts, row_ends, scale, scores_dtype)`` call.
When the matmul operands are ``reshape(expand(x))`` of the same batch shape (``torch.matmul`` of ``[B, H, S,
D]`` tensors), the op takes the unexpanded ``x`` (a ``k``/``v`` shared by the heads is then read in place,
not copied per head); otherwise it takes the flattened ``[B*H, S, D]`` operands.  The rounding points of
the matched graph (scores in q's dtype after the matmul, the scale applied in q's dtype or after an
upcast, weights rounded to v's dtype) become the op's ``scores_dtype`` and ``v.dtype``.

Left alone, with the reason in ``report()``: weights or scores with another consumer, ``x @ probs`` (the
weights on the right), transposed scores (a softmax over the queries), an added bias, two scale factors
(each product rounds), a scale that reaches the graph as a tensor (``patterns/common.graph_value_reason``),
a bool mask that did not become row bounds, and probabilities rounded to a dtype other than v's before the
matmul.  In verify mode (``register_dsa_passes(verify=True)``) the windowed softmax is followed by its check,
so this fold does not apply.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..lowerings import windowed_attention as _op_module
from ..lowerings import windowed_softmax as _ws_module  # noqa: F401  (defines the anchor op)
from ..report import log, source_location, stats_for
from .common import Rule, graph_value_reason
from .mask_topk import _new_node
from .sparse_attention import Reject, _is, _val

aten = torch.ops.aten
prims = torch.ops.prims
WS = torch.ops.dsa_inductor.windowed_softmax.default
OP = torch.ops.dsa_inductor.windowed_attention.default
_MATMULS = (aten.bmm.default, aten.mm.default)
_RESHAPES = (aten.reshape.default, aten.view.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
             aten.squeeze.default, aten.clone.default)
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _same(a, b) -> bool:
    """Shapes (or size lists) known to be equal, symbolic sizes included."""
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def _is_one(d) -> bool:
    return statically_known_true(d == 1)


def _keeps_order(node) -> bool:
    """Is ``node`` a view (or copy) of its input with the same elements in the same row-major order?"""
    if _is(node, *_RESHAPES):
        return True
    if _is(node, aten.expand.default):
        return _same(_val(node).shape, _val(node.args[0]).shape)
    if _is(node, aten.permute.default):
        shape = _val(node.args[0]).shape
        moved = [p % len(shape) for p in node.args[1] if not _is_one(shape[p])]
        return moved == sorted(moved)  # only size-1 dims move
    return False


def _scalar_like(node) -> bool:
    val = _val(node)
    return not isinstance(val, torch.Tensor) or val.dim() == 0


def _scale_of(node, have_scale: bool):
    """``(tensor operand, factor)`` of a ``mul``/``div`` by a Python number; raises Reject otherwise."""
    a, b = node.args[:2]
    if _is(node, aten.div.Tensor, aten.div.Scalar):
        x, c, div = a, b, True
    elif isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node):  # the factor: a 0-d tensor or a SymFloat
        x, c, div = (b, a, False) if _scalar_like(a) and not _scalar_like(b) else (a, b, False)
    else:
        x, c, div = (a, b, False) if isinstance(a, torch.fx.Node) else (b, a, False)
    if not isinstance(x, torch.fx.Node):
        raise Reject("the scores are a number divided by a tensor, not scaled scores")
    if isinstance(c, torch.fx.Node):
        cv = _val(c)
        if isinstance(cv, torch.Tensor) and cv.numel() != 1:
            raise Reject("the scores are multiplied by a tensor, not one number")
        raise Reject(graph_value_reason("scale", c) or "the scale is not a number")
    if have_scale:
        raise Reject("the scores are scaled twice (each product rounds): the op takes one scale")
    if isinstance(c, bool) or not isinstance(c, (int, float)):
        raise Reject(f"the scale {c!r} is not a number")
    factor = 1.0 / c if div and c else (math.inf if div else float(c))
    if not math.isfinite(factor):
        raise Reject(f"the scale {'1 / ' if div else ''}{c} is not finite")
    return x, factor


def _scores_chain(ws, nodes):
    """Walk up from the softmax input to the ``q @ k^T`` matmul: ``(mm, scale, scores_dtype)``."""
    cur = ws.args[0]
    scale, scale_dtype = None, None
    while not _is(cur, *_MATMULS):
        if len(cur.users) != 1:
            raise Reject("the scores have another consumer: they must be materialized")
        nodes.append(cur)
        if _is(cur, prims.convert_element_type.default):
            src, dst = _val(cur.args[0]).dtype, cur.args[1]
            if dst not in (src, torch.float32):
                raise Reject(f"the scores are rounded to {dst} between the matmul and the softmax")
            cur = cur.args[0]
        elif _is(cur, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
            cur, scale = _scale_of(cur, scale is not None)
            scale_dtype = _val(nodes[-1]).dtype
        elif _keeps_order(cur):
            cur = cur.args[0]
        else:
            what = getattr(cur, "target", cur)
            raise Reject(f"the scores come from {what}, not a q @ k^T matmul (times a number)")
    if len(cur.users) != 1:
        raise Reject("the q @ k^T product has another consumer: it must be materialized")
    if not _same(_val(cur).shape[-2:], _val(ws.args[0]).shape[-2:]):
        raise Reject("the softmax rows are not the rows of q @ k^T (the scores are transposed, or the matmul "
                     "folded batch dims into its rows)")
    return cur, (1.0 if scale is None else scale), (scale_dtype or _val(cur).dtype)


def _probs_chain(ws, nodes):
    """Walk down from the softmax to the ``probs @ v`` matmul: ``(mm, the matmul's left operand)``."""
    cur = ws
    while True:
        users = list(cur.users)
        if len(users) != 1:
            raise Reject("the attention weights have another consumer: they must be materialized")
        nxt = users[0]
        if _is(nxt, *_MATMULS):
            break
        if not (_is(nxt, prims.convert_element_type.default) or _keeps_order(nxt)):
            raise Reject(f"the attention weights feed {getattr(nxt, 'target', nxt)}, not a matmul with v")
        nodes.append(nxt)
        cur = nxt
    if nxt.args[0] is not cur:
        raise Reject("the attention weights are the right operand of a matmul (x @ probs), not probs @ v")
    if not _same(_val(cur).shape[-2:], _val(ws).shape[-2:]):
        raise Reject("the attention weights reach the matmul transposed or reshaped, not as [..., S, T]")
    return nxt, cur


def _probs_rounding(ws, nodes, v_dtype) -> Optional[str]:
    """Why the weights' roundings are not 'softmax in fp32, rounded to v's dtype' (None if they are)."""
    out_dtype, in_dtype = ws.args[4], _val(ws.args[0]).dtype
    if out_dtype not in (torch.float32, in_dtype):
        return f"the softmax rounds its {in_dtype} scores to {out_dtype} first"
    steps = [out_dtype] + [n.args[1] for n in nodes if _is(n, prims.convert_element_type.default)]
    odd = [d for d in steps if d not in (torch.float32, v_dtype)]
    if odd:
        return f"the attention weights are rounded to {odd[0]} before the matmul with {v_dtype} v"
    return None


def _peel(node):
    """``reshape([clone](expand(x, [*batch, R, C])))`` (torch.matmul's broadcast) -> ``(x, batch)``."""
    if not _is(node, aten.reshape.default):
        return None
    cur = node.args[0]
    if _is(cur, aten.clone.default):
        cur = cur.args[0]
    if not _is(cur, aten.expand.default):
        return None
    x, target = cur.args[0], _val(cur).shape
    if _val(x).dim() < 2 or not _same(_val(x).shape[-2:], target[-2:]):
        return None
    return x, list(target[:-2])


def _untransposed(graph, kt):
    """``k`` for the matmul operand ``kt = k^T``: the input of a last-two-dims permute, else a new permute."""
    rank = _val(kt).dim()
    swap = [*range(rank - 2), rank - 1, rank - 2]
    if _is(kt, aten.permute.default) and [p % rank for p in kt.args[1]] == swap:
        return kt.args[0]
    return _new_node(graph, aten.permute.default, (kt, swap))


def _flat_bounds(bound, rows_batch, op_batch) -> str:
    """How row bounds laid over the softmax's rows ``[*rows_batch, S]`` serve the op's rows ``[*op_batch, S]``
    (the batch dims flattened by the matmul): ``"keep"``, or ``"squeeze"`` to ``[S]`` when they vary only
    along S; raises Reject when they vary along a flattened dim."""
    shape = _val(bound).shape
    if all(_is_one(d) for d in shape[:-1]):
        return "keep" if len(shape) <= 1 else "squeeze"
    if _same(rows_batch, op_batch):
        return "keep"
    raise Reject("the row bounds vary along batch or head dims that the matmul flattened")


def _match_and_build(graph, ws) -> str:
    """Check the chain around one windowed_softmax node and replace it by the fused op; returns the variant
    name (raises Reject, leaving the graph unchanged, when the chain is not a windowed attention)."""
    scores, starts, ends, mask = ws.args[:4]
    if mask is not None:
        raise Reject("the window is a bool mask that did not become row bounds")
    ws_in = _val(scores)
    if not _same(ws_in.shape, _val(ws).shape):
        raise Reject("the row bounds broadcast the scores to more rows")
    nodes = []
    mm1, scale, scores_dtype = _scores_chain(ws, nodes)
    mm2, _ = _probs_chain(ws, nodes)
    q, kt, v = mm1.args[0], mm1.args[1], mm2.args[1]
    qv, vv = _val(q), _val(v)
    if qv.dtype not in _FLOATS or vv.dtype not in _FLOATS:
        raise Reject(f"q / v dtypes {qv.dtype}, {vv.dtype}: the op takes float32, float16, bfloat16")
    why = _probs_rounding(ws, nodes, vv.dtype)
    if why:
        raise Reject(why)
    rows_batch = list(ws_in.shape[:-2])
    peeled = [_peel(n) for n in (q, kt, v)]
    user = next(iter(mm2.users)) if len(mm2.users) == 1 else None
    broadcast = (all(p is not None and _same(p[1], rows_batch) for p in peeled) and
                 _is(user, aten.reshape.default) and _same(_val(user).shape, [*rows_batch, *_val(mm2).shape[-2:]]))
    if broadcast:  # the unexpanded operands, batch dims as the softmax's: the bounds as they are
        (q, _), (kt, _), (v, _) = peeled
        plans, replaced = ("keep", "keep"), user
    else:  # the matmul's own (flattened) operands
        op_batch = list(_val(mm2).shape[:-2])
        plans = tuple(None if b is None else _flat_bounds(b, rows_batch, op_batch) for b in (starts, ends))
        replaced = mm2
    with graph.inserting_before(mm2), qv.fake_mode:
        bounds = [_new_node(graph, aten.reshape.default, (b, [-1])) if plan == "squeeze" else b
                  for b, plan in zip((starts, ends), plans)]
        fused = _new_node(graph, OP, (q, _untransposed(graph, kt), v, *bounds, scale, scores_dtype))
    fv, rv = _val(fused), _val(replaced)
    assert _same(fv.shape, rv.shape) and fv.dtype == rv.dtype, (fv, rv)  # what the checks above ensure
    replaced.replace_all_uses_with(fused)
    kind = "mm" if _is(mm1, aten.mm.default) else "bmm"
    upcast = "" if scores_dtype == qv.dtype else f"->{_SHORT[scores_dtype]}"
    return f"{kind}:{'broadcast' if broadcast else 'flat'}:{_SHORT[qv.dtype]}{upcast}"


class WindowedAttentionRule(Rule):
    name = "windowed_attention"
    op = _op_module.OP_NAME
    anchors = (WS,)

    def variants(self):
        return ()  # a graph walk from the windowed_softmax op (see the module docstring)

    def apply(self, graph: torch.fx.Graph) -> int:
        if self.verify:  # the windowed softmax feeds its check, not the matmul: nothing to fold
            return 0
        st = stats_for(self.name, self.op)
        matched = 0
        for ws in self.candidates(graph):
            st.candidates += 1
            try:
                variant = _match_and_build(graph, ws)
            except Reject as r:
                st.rejections[str(r)] += 1
                log.info("rule %s left %s at %s alone: %s", self.name, ws.name, source_location(ws), r)
                continue
            st.matches[variant] += 1
            st.locations[source_location(ws)] += 1
            matched += 1
        if matched:
            graph.eliminate_dead_code()
            log.info("rule %s: %d match(es) -> %s", self.name, matched, self.op)
        return matched

    def diagnose(self, node: torch.fx.Node) -> str:  # (apply records each rejection's reason itself)
        return "not a windowed attention"
