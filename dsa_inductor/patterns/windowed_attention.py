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

**Attention sink** (transformers' DeepSeek-V4 ``eager_attention_forward``; gpt-oss writes the same)::

    scores = torch.matmul(q, repeat_kv(kv).transpose(2, 3)) * scaling + attention_mask   # where(keep, 0, min)
    combined = torch.cat([scores, sinks.reshape(1, -1, 1, 1).expand(b, -1, s, -1)], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values                     # optional
    probs = F.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]                 # drop the sink
    out = torch.matmul(probs.to(v.dtype), v)

The softmax input is a ``cat`` rather than masked scores, so windowed_softmax does not see it; this rule
walks from each ``cat([scores, column], -1)`` whose row max is taken (the other cats are not counted): the
column must broadcast per-row (per-head) logits, the cat feed one decomposed softmax over the last dim (after
the explicit max subtraction, a no-op for the softmax), the sink's column be dropped by ``[..., :-1]``, and
the rest reach ``@ v`` as above.  Upward, the scores may carry one ``+ where(keep, 0, fill)`` with ``fill``
-inf or a float dtype's ``finfo.min`` (through expands and unsqueezes, whose bounds take the same views) and
``keep`` an ``arange`` window (``mask_topk._mask_as_bounds``: V4's ``(True & (kv > q - w)) & (kv <= q)``).
The op then gets the window bounds and ``sinks``.  Equal to eager's additive mask whenever ``|score|`` is far
below ``|fill|`` (a finite ``min + score`` rounds to ``min``, weight exactly 0 once the sink bounds the row max);
a 16-bit ``combined`` (sinks cast to the model dtype) is a bf16 softmax in eager and an fp32 one in the op,
within the bf16 tolerance.  Left alone with the reason: the sink column kept (another slice), a finite fill
such as -1e4, ``where(keep, 1, min)``, a softmax over another dim, the weights used elsewhere, and an additive
mask that is not an ``arange`` window.

DeepSeek-V4's compressed layers (CSA, HCA) attend over ``cat([kv, compressed_kv], 2)`` with the mask
``cat([window mask, block_bias], -1)``: the op's *tail* segment.  Keys ``[0, tail)`` (``tail`` = the first
part's key count, a ``sym_size`` node when symbolic) keep the window; the keys after it take the second part,
either a window too (HCA's ``zeros.masked_fill(entry >= (pos + 1) // m, -inf)``, a drop mask: ``tail_ends``) or,
when it is no ``arange`` window, as an additive tensor read by the kernel (CSA's ``full(-inf).scatter(picks, 0)``:
``tail_bias``).  At decode V4 pads the window's mask with zeros instead (``F.pad(mask, (0, n))``, every
compressed key visible): a tail with neither.  A cat of more than two masks, or one whose first part is not the
window, is left alone.

**Key lists.**  When such a sink attention has one K = V head shared by the heads (V4's ``repeat_kv``) and a
window of constant width (the config's ``sliding_window``), it becomes ``dsa_inductor::sparse_attention`` over
each query's list of keys instead (the window's, then the tail's: every compressed key under its bounds, or a
CSA layer's scattered picks): ``patterns/key_lists.py`` says when that is exact.  The heads then share each
gathered key tile, and a CSA layer reads its K picks rather than all compressed keys.
"""

from __future__ import annotations

import math
import operator
from typing import Optional

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..lowerings import windowed_attention as _op_module
from ..lowerings import windowed_softmax as _ws_module  # noqa: F401  (defines the anchor op)
from ..report import log, source_location, stats_for
from . import key_lists
from .common import Rule, graph_value_reason
from .mask_topk import _bound_node, _mask_as_bounds, _new_node
from .sparse_attention import MASKED_FILLS, Reject, _is, _val

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


def _unpadded_product(node):
    """Inductor's ``pad_mm`` (CUDA) pads the keys of ``q @ k^T`` when their count is not aligned and slices the
    extra columns off: ``slice(mm(q, pad(kt, [0, p])), -1, 0, T)``.  Those columns are products with zeros,
    dropped, so the same scores are ``mm(q, kt)``: that product is put in the slice's place (it is what eager
    computes; a later rejection leaves it, the same values) and returned.  None for any other node."""
    if not _is(node, aten.slice.Tensor):
        return None
    x, dim, start, end, step = list(node.args) + [None] * (5 - len(node.args))
    if not _is(x, *_MATMULS) or len(x.users) != 1 or start not in (0, None) or step not in (1, None):
        return None
    if dim not in (-1, _val(x).dim() - 1):
        return None
    padded = _right_padded(x.args[1], 1)
    if isinstance(end, torch.fx.Node):  # a symbolic key count: the node computing it
        end = _val(end)
    if padded is None or end is None or not statically_known_true(end == _val(padded[0]).shape[-1]):
        return None
    graph = node.graph
    with graph.inserting_before(node), _val(x).fake_mode:
        mm = _new_node(graph, x.target, (x.args[0], padded[0]))
    node.replace_all_uses_with(mm)
    return mm


def _scores_chain(ws, nodes, cur=None):
    """Walk up from the softmax input (``ws.args[0]``, or ``cur``) to the ``q @ k^T`` matmul:
    ``(mm, scale, scores_dtype)``."""
    cur = ws.args[0] if cur is None else cur
    top = cur
    scale, scale_dtype = None, None
    while not _is(cur, *_MATMULS):
        if len(cur.users) != 1:
            raise Reject("the scores have another consumer: they must be materialized")
        unpadded = _unpadded_product(cur)  # (the slice it replaces keeps its value for the shape check below)
        if unpadded is not None:
            cur = unpadded
            continue
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
    if not _same(_val(cur).shape[-2:], _val(top).shape[-2:]):
        raise Reject("the softmax rows are not the rows of q @ k^T (the scores are transposed, or the matmul "
                     "folded batch dims into its rows)")
    return cur, (1.0 if scale is None else scale), (scale_dtype or _val(cur).dtype)


def _right_padded(node, dim_from_end: int):
    """``constant_pad_nd(x, pad)`` with value 0 padding only dim ``-dim_from_end`` on its right: ``(x, amount)``,
    else None.  ``pad`` lists (left, right) pairs from the last dim on, and may go on with zero pairs for the
    dims before (pad_mm on an H100 writes ``[0, p, 0, 0, 0, 0]`` for a 3-d operand)."""
    if not _is(node, aten.constant_pad_nd.default):
        return None
    pad = list(node.args[1])
    value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)
    at = 2 * dim_from_end - 1
    if value != 0 or len(pad) % 2 or len(pad) <= at or any(p != 0 for i, p in enumerate(pad) if i != at):
        return None
    return node.args[0], pad[at]


def _probs_chain(ws, nodes):
    """Walk down from the softmax to the ``probs @ v`` matmul: ``(mm, the matmul's left operand, v)``.

    Inductor's ``pad_mm`` (CUDA) may pad the matmul's reduction dim, the keys: ``bmm(pad(probs, [0, p]),
    pad(v, [0, 0, 0, p]))`` adds only zero products, so the unpadded probabilities and ``v`` are taken."""
    cur = ws
    while True:
        users = list(cur.users)
        if len(users) != 1:
            raise Reject("the attention weights have another consumer: they must be materialized")
        nxt = left = users[0]
        if _is(nxt, *_MATMULS):
            left, v = cur, nxt.args[1]
            break
        padded = _right_padded(nxt, 1)
        if padded is not None and len(nxt.users) == 1 and _is(next(iter(nxt.users)), *_MATMULS):
            mm = next(iter(nxt.users))
            v_padded = _right_padded(mm.args[1], 2)
            if mm.args[0] is nxt and v_padded is not None and v_padded[1] == padded[1]:
                nodes.append(nxt)
                nxt, v = mm, v_padded[0]
                break  # (left: the padded weights)
        if not (_is(nxt, prims.convert_element_type.default) or _keeps_order(nxt)):
            raise Reject(f"the attention weights feed {getattr(nxt, 'target', nxt)}, not a matmul with v")
        nodes.append(nxt)
        cur = nxt
    if nxt.args[0] is not left:
        raise Reject("the attention weights are the right operand of a matmul (x @ probs), not probs @ v")
    if not _same(_val(cur).shape[-2:], _val(ws).shape[-2:]):
        raise Reject("the attention weights reach the matmul transposed or reshaped, not as [..., S, T]")
    return nxt, cur, v


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
    mm2, _, v = _probs_chain(ws, nodes)
    vv = _val(v)
    why = _probs_rounding(ws, nodes, vv.dtype) if vv.dtype in _FLOATS else None
    if why:
        raise Reject(why)
    return _build(graph, mm1, mm2, v, list(ws_in.shape[:-2]), starts, ends, scale, scores_dtype, None, "")


def _broadcast_operands(mm1, mm2, v, rows_batch):
    """``(q, kt, v, user)``: the unexpanded operands of ``torch.matmul``'s broadcast (``reshape(expand(x))``
    with the softmax's batch dims ``rows_batch``) and the reshape of ``mm2`` back to them; None otherwise."""
    peeled = [_peel(n) for n in (mm1.args[0], mm1.args[1], v)]
    user = next(iter(mm2.users)) if len(mm2.users) == 1 else None
    if (all(p is not None and _same(p[1], rows_batch) for p in peeled) and _is(user, aten.reshape.default)
            and _same(_val(user).shape, [*rows_batch, *_val(mm2).shape[-2:]])):
        return peeled[0][0], peeled[1][0], peeled[2][0], user
    return None


def _build(graph, mm1, mm2, v, rows_batch, starts, ends, scale, scores_dtype, sinks, tag, tail=None) -> str:
    """Replace ``probs @ v`` (``mm2``, whose probabilities come from the scores of ``mm1``) by the fused op;
    ``sinks`` (a node broadcastable to the rows ``[*rows_batch, S]``) or None.  Returns the variant name."""
    q, kt = mm1.args[0], mm1.args[1]
    qv, vv = _val(q), _val(v)
    if qv.dtype not in _FLOATS or vv.dtype not in _FLOATS:
        raise Reject(f"q / v dtypes {qv.dtype}, {vv.dtype}: the op takes float32, float16, bfloat16")
    unexpanded = _broadcast_operands(mm1, mm2, v, rows_batch)
    broadcast = unexpanded is not None
    if broadcast:  # the unexpanded operands, batch dims as the softmax's: the bounds as they are
        q, kt, v, user = unexpanded
        plans, replaced = ("keep", "keep"), user
    else:  # the matmul's own (flattened) operands
        op_batch = list(_val(mm2).shape[:-2])
        plans = tuple(None if b is None else _flat_bounds(b, rows_batch, op_batch) for b in (starts, ends))
        replaced = mm2
    with graph.inserting_before(mm2), qv.fake_mode:
        bounds = [_new_node(graph, aten.reshape.default, (b, [-1])) if plan == "squeeze" else b
                  for b, plan in zip((starts, ends), plans)]
        extra = ()
        if tail is not None and not broadcast:
            raise Reject("a tail segment (a cat of masks) needs q, k, v with the softmax's batch dims")
        if sinks is not None:
            if not broadcast:  # laid over the matmul's flattened rows
                rows = [*rows_batch, _val(mm1).shape[-2]]
                sinks = _new_node(graph, aten.expand.default, (sinks, rows))
                sinks = _new_node(graph, aten.reshape.default, (sinks, [*_val(mm2).shape[:-2], rows[-1]]))
            extra = (sinks,)
        if tail is not None:
            extra = (*extra, *tail)
        fused = _new_node(graph, OP, (q, _untransposed(graph, kt), v, *bounds, scale, scores_dtype, *extra))
    fv, rv = _val(fused), _val(replaced)
    assert _same(fv.shape, rv.shape) and fv.dtype == rv.dtype, (fv, rv)  # what the checks above ensure
    replaced.replace_all_uses_with(fused)
    kind = "mm" if _is(mm1, aten.mm.default) else "bmm"
    upcast = "" if scores_dtype == qv.dtype else f"->{_SHORT[scores_dtype]}"
    return f"{tag}{kind}:{'broadcast' if broadcast else 'flat'}:{_SHORT[qv.dtype]}{upcast}"


# ---------------------------------------------------------------------------------------------------------
# Attention sink (DeepSeek-V4, gpt-oss): graph walk from the cat of the scores and the sink column
# ---------------------------------------------------------------------------------------------------------

def _last_dim(node, dim) -> bool:
    rank = _val(node).dim()
    return isinstance(dim, int) and dim % rank == rank - 1


def _is_sink_cat(node) -> bool:
    """``cat([scores, column], -1)`` with a ``[..., 1]`` column, whose row max is taken (by the softmax or
    before it): the shape of a sink, worth a candidate."""
    if not _is(node, aten.cat.default) or len(node.args[0]) != 2:
        return False
    if not any(_is(u, aten.amax.default, aten.max.dim, prims.convert_element_type.default) for u in node.users):
        return False
    dim = node.args[1] if len(node.args) > 1 else 0
    col = _val(node.args[0][1])
    return _last_dim(node, dim) and col is not None and col.dim() >= 2 and _is_one(col.shape[-1])


def _sink_source(col, rows):
    """The per-row sink logits behind the ``[*rows, 1]`` column: the column with its expands peeled and the
    last dim squeezed, a node broadcastable to ``rows``.  Raises Reject when it broadcasts the rows further."""
    cur = col
    while _is(cur, aten.expand.default, prims.convert_element_type.default):
        cur = cur.args[0]
    shape = _val(cur).shape
    if len(shape) > len(rows) + 1 or not _is_one(shape[-1]):
        raise Reject("the sink column is not a [..., 1] tensor of per-row (per-head) logits")
    try:
        if not _same(torch.broadcast_shapes(tuple(shape[:-1]), tuple(rows)), rows):
            raise Reject("the sink column broadcasts the scores to more rows")
    except RuntimeError:
        raise Reject("the sink column does not broadcast with the scores' rows") from None
    return cur


def _softmax_probs(x, nodes):
    """``x`` feeds one softmax over its last dim, decomposed as post-grad graphs hold it (``amax``, ``sub``,
    ``exp``, ``sum``, ``div``; an upcast first for a 16-bit softmax computed in fp32).  Returns the ``div``."""
    users = list(x.users)
    if len(users) == 1 and _is(users[0], prims.convert_element_type.default):
        nodes.append(users[0])
        x, users = users[0], list(users[0].users)
    amax = [u for u in users if _is(u, aten.amax.default) and u.args[0] is x]
    sub = [u for u in users if _is(u, aten.sub.Tensor) and u.args[0] is x]
    if len(users) != 2 or len(amax) != 1 or len(sub) != 1 or sub[0].args[1] is not amax[0]:
        raise Reject("the scores with the sink do not feed one softmax (amax, sub, exp, sum, div)")
    dims = amax[0].args[1] if len(amax[0].args) > 1 else []
    if len(dims) != 1 or not _last_dim(x, dims[0]):
        raise Reject("the softmax with the sink is not over the last dim (the keys)")
    exp = list(sub[0].users)
    if len(exp) != 1 or not _is(exp[0], aten.exp.default):
        raise Reject("the scores with the sink do not feed one softmax (amax, sub, exp, sum, div)")
    exp = exp[0]
    total = [u for u in exp.users if _is(u, aten.sum.dim_IntList)]
    div = [u for u in exp.users if _is(u, aten.div.Tensor) and u.args[0] is exp]
    if len(exp.users) != 2 or len(total) != 1 or len(div) != 1 or div[0].args[1] is not total[0] \
            or len(total[0].args[1]) != 1 or not _last_dim(exp, total[0].args[1][0]):
        raise Reject("the scores with the sink do not feed one softmax (amax, sub, exp, sum, div)")
    nodes += [amax[0], sub[0], exp, total[0], div[0]]
    return div[0]


def _max_subtracted(cat, nodes):
    """transformers' DeepSeek-V4 ``combined - combined.max(dim=-1, keepdim=True).values`` before the softmax
    (a no-op for the softmax): the ``sub`` node, else ``cat`` itself."""
    users = list(cat.users)
    mx = [u for u in users if _is(u, aten.max.dim, aten.amax.default) and u.args[0] is cat]
    if len(users) != 2 or len(mx) != 1:
        return cat
    mx = mx[0]
    ref = mx
    if _is(mx, aten.max.dim):
        got = [u for u in mx.users if u.target is operator.getitem]
        if len(got) != 1 or got[0].args[1] != 0:
            return cat
        ref = got[0]
    dims = mx.args[1] if len(mx.args) > 1 else None
    dims = [dims] if isinstance(dims, int) else dims
    keepdim = mx.args[2] if len(mx.args) > 2 else mx.kwargs.get("keepdim", False)
    sub = [u for u in users if _is(u, aten.sub.Tensor) and u.args == (cat, ref)]
    if not sub or not keepdim or len(dims or ()) != 1 or not _last_dim(cat, dims[0]) or len(ref.users) != 1:
        return cat
    nodes += [mx, ref, sub[0]] if ref is not mx else [mx, sub[0]]
    return sub[0]


def _sink_softmax(cat, nodes):
    """The softmax over ``cat``, straight or after transformers' explicit max subtraction: its ``div``."""
    first = []
    try:
        div = _softmax_probs(cat, first)
    except Reject:
        x = _max_subtracted(cat, first)
        if x is cat:
            raise
        div = _softmax_probs(x, first)
    nodes += first
    return div


def _drop_sink(div, nodes, way):
    """``probs[..., :-1]``: the slice that drops the sink column (after the rounding of a 16-bit softmax's
    probabilities, which goes to ``way``)."""
    users = list(div.users)
    if len(users) == 1 and _is(users[0], prims.convert_element_type.default):
        way.append(users[0])
        div, users = users[0], list(users[0].users)
    if len(users) != 1 or not _is(users[0], aten.slice.Tensor):
        raise Reject("the sink's probability column is not dropped (probs[..., :-1]) before the matmul")
    sl = users[0]
    dim, start, end = (list(sl.args[1:]) + [0, None, None])[:3]
    n = _val(div).shape[-1]
    step = sl.args[4] if len(sl.args) > 4 else 1
    if not _last_dim(div, dim) or start not in (0, None) or step != 1 or not (
            end == -1 or (end is not None and statically_known_true(end == n - 1))):
        raise Reject("the slice after the sink softmax is not probs[..., :-1] (the sink column dropped)")
    nodes.append(sl)
    return sl


def _peeled(node):
    """Peel expands / unsqueezes / casts: ``(the tensor below them, the expands and unsqueezes, outermost
    first)``."""
    views = []
    while _is(node, aten.expand.default, aten.unsqueeze.default, prims.convert_element_type.default):
        if not _is(node, prims.convert_element_type.default):
            views.append(node)
        node = node.args[0]
    return node, views


def _outer_views(bias):
    """``_peeled`` for an additive mask, whose bounds take the same views (so that they lie over the same rows):
    an unsqueeze at its last dim has no such counterpart."""
    cur, outer = _peeled(bias)
    if any(_is(o, aten.unsqueeze.default) and o.args[1] % _val(o).dim() == _val(o).dim() - 1 for o in outer):
        raise Reject("the additive mask is unsqueezed at its last dim")
    return cur, outer


def _constant(node):
    """A Python number, or the value of an ``aten.full`` of any shape; else None."""
    if isinstance(node, (int, float)):
        return node
    if _is(node, aten.full.default):
        return node.args[1]
    return None


def _additive_window(bias, row_len, above=()):
    """``where(keep, 0, fill)`` or ``where(drop, fill, 0)`` (through expands and casts) with ``fill`` -inf or a
    float dtype's finfo.min and ``keep`` / ``drop`` an arange window (V4's compressed layers: ``zeros.masked_fill(
    entry >= (pos + 1) // m, -inf)``): ``_mask_as_bounds``'s result, its peels followed by the views of ``bias``
    and then by ``above`` (the views above the cat or pad that holds it, outermost first).  Raises Reject
    otherwise."""
    cur, outer = _outer_views(bias)
    if not _is(cur, aten.where.self):
        raise Reject("the additive mask is not where(keep, 0, -inf or finfo.min) (a cat of masks, or a tensor)")
    cond, a, b = cur.args[:3]
    if _constant(a) == 0 and _constant(b) in MASKED_FILLS:
        drop = False
    elif _constant(b) == 0 and _constant(a) in MASKED_FILLS:
        drop = True
    else:
        raise Reject("the additive mask is not where(keep, 0, -inf or finfo.min): kept scores change, or "
                     "masked ones keep a weight")
    found = _mask_as_bounds(cond, negate=drop, row_len=row_len)
    if found is None or _val(cond).dim() != _val(cur).dim():
        raise Reject("the additive mask's keep is not an arange window (row_starts <= kv < row_ends)")
    peels, bounds, rank = found
    return [*peels, *reversed(outer), *reversed(above)], bounds, rank


def _split_mask(bias, row_len):
    """The additive mask of the scores: one window (``(found, None)``), or DeepSeek-V4's compressed layers'
    ``cat([window mask, tail mask], -1)`` over ``cat([kv, compressed_kv])``: ``(found, (tail, tail_found,
    tail_bias))`` with ``tail`` the first part's key count, and the second part either a window too
    (``tail_found``, bounds relative to the tail: HCA's causal block mask) or any additive tensor
    (``tail_bias``: CSA's 0 / -inf block bias from the indexer's picks)."""
    cur, outer = _outer_views(bias)
    padded = _right_padded(cur, 1)
    if padded is not None and not any(_is(o, aten.unsqueeze.default) for o in outer):
        # V4 at decode: F.pad(window mask, (0, n), value=0) for compressed keys all visible: a tail, unmasked
        head = padded[0]
        return _additive_window(head, _val(head).shape[-1], outer), (head, None, None)
    if not _is(cur, aten.cat.default):
        return _additive_window(bias, row_len), None
    parts = cur.args[0]
    dim = cur.args[1] if len(cur.args) > 1 else 0
    if len(parts) != 2 or not _last_dim(cur, dim) or any(_is(o, aten.unsqueeze.default) for o in outer):
        raise Reject("the additive mask is a cat that is not [window mask, tail mask] along the keys")
    head, rest = parts
    n_head, n_rest = _val(head).shape[-1], _val(rest).shape[-1]
    found = _additive_window(head, n_head, outer)
    try:
        tail_found, tail_bias = _additive_window(rest, n_rest, outer), None
    except Reject:
        tail_found, tail_bias = None, rest
        tv = _val(rest)
        if tv.dtype not in _FLOATS or tv.dim() < 2:
            raise Reject("the tail of the additive mask is not a float [..., S, T2] tensor") from None
    return found, (head, tail_found, tail_bias)


def _masked_scores(x, nodes):
    """Walk up from the cat's scores through casts and one additive mask: ``(scores, found)`` with ``found``
    ``_split_mask``'s result or None (no mask)."""
    found = None
    cur = x
    while True:
        if len(cur.users) != 1:
            raise Reject("the scores have another consumer: they must be materialized")
        if _is(cur, prims.convert_element_type.default) and cur.args[1] in (torch.float32, _val(cur.args[0]).dtype):
            nodes.append(cur)
            cur = cur.args[0]
        elif _is(cur, aten.add.Tensor) and found is None and all(isinstance(a, torch.fx.Node) for a in cur.args[:2]):
            nodes.append(cur)
            n = _val(cur).shape[-1]
            a, b = cur.args[:2]
            masks = (aten.where.self, aten.cat.default, aten.constant_pad_nd.default)
            mask, cur = (a, b) if _is(_peeled(a)[0], *masks) and not _is(_peeled(b)[0], *masks) else (b, a)
            found = _split_mask(mask, n)
            if not _same(_val(cur).shape, _val(x).shape):
                raise Reject("the additive mask broadcasts the scores to more rows")
        else:
            return cur, found


def _match_sink(graph, cat) -> str:
    """Check the chain around one ``cat([scores, sink], -1)`` and replace it by the fused op."""
    scores_in, col = cat.args[0]
    rows = list(_val(scores_in).shape[:-1])
    nodes = []
    sinks = _sink_source(col, rows)
    div = _sink_softmax(cat, nodes)
    way = []  # the probabilities' way to the matmul
    probs = _drop_sink(div, nodes, way)
    mm2, _, v = _probs_chain(probs, way)
    nodes += way
    vv = _val(v)
    odd = [n.args[1] for n in way if _is(n, prims.convert_element_type.default)
           and n.args[1] not in (torch.float32, vv.dtype)]
    if odd:
        raise Reject(f"the attention weights are rounded to {odd[0]} before the matmul with {vv.dtype} v")
    scores, found = _masked_scores(scores_in, nodes)
    mm1, scale, scores_dtype = _scores_chain(None, nodes, cur=scores)
    starts = ends = tail = None
    tag = "sink:"
    with graph.inserting_before(mm2), _val(mm2).fake_mode:
        if found is not None:
            (found, tail_of) = found
            starts, ends = _bounds(graph, found)
            tag += "window:"
            n_head = key_tail = None
            if tail_of is not None:
                head, tail_found, tail_bias = tail_of
                n_head = _val(head).shape[-1]
                if not isinstance(n_head, int):  # a symbolic key count: a node that computes it
                    n_head = _new_node(graph, aten.sym_size.int, (head, -1))
                tail_starts, tail_ends = _bounds(graph, tail_found) if tail_found is not None else (None, None)
                tail = (n_head, tail_starts, tail_ends, tail_bias)
                key_tail = ("picks", tail_bias) if tail_bias is not None else ("bounds", tail_starts, tail_ends)
                tag += ("tail_window:" if tail_found is not None else "tail_bias:" if tail_bias is not None
                        else "tail_open:")
            variant = _key_lists(graph, mm1, mm2, v, rows[:-1], found, ends, n_head, key_tail, sinks, scale)
            if variant:
                return variant
        sinks = _new_node(graph, aten.squeeze.dim, (sinks, -1))
    return _build(graph, mm1, mm2, v, rows[:-1], starts, ends, scale, scores_dtype, sinks, tag, tail)


def _key_lists(graph, mm1, mm2, v, rows_batch, found, ends, n_head, tail, sinks, scale) -> Optional[str]:
    """A constant-width window over one K = V head shared by the heads (DeepSeek-V4), with its tail segment if
    any, as ``sparse_attention`` over each query's key list (``patterns/key_lists.py``): the variant name, or None
    (logged) when that does not apply and the windowed kernel stays."""
    width = key_lists.window_width(found)
    ops = _broadcast_operands(mm1, mm2, v, rows_batch)
    if tail is not None and tail[0] == "picks":  # ("picks", bias) -> ("picks", bias, the scatter's index)
        tail = (*tail, key_lists.scattered_picks(tail[1]))
    picks_ok = tail is None or tail[0] != "picks" or tail[2] is not None
    if width is None or ops is None or not picks_ok:
        why = ("the window's width is not constant" if width is None else "q, k, v are not matmul-broadcast "
               "[B, H, ., .] operands" if ops is None else "the tail's bias is not scattered picks")
        log.info("rule windowed_attention: no key lists (%s): the windowed kernel", why)
        return None
    q, kt, v, user = ops
    try:
        return key_lists.build(graph, q, _untransposed(graph, kt), v, user, ends, width, n_head, tail, sinks, scale)
    except Reject as r:
        log.info("rule windowed_attention: no key lists (%s): the windowed kernel", r)
        return None


def _bounds(graph, found):
    """(row_starts, row_ends) nodes (either None) for ``_mask_as_bounds``'s ``found``."""
    peels, bounds, rank = found
    made = {kind: _bound_node(graph, row, peels, terms, rank) for kind, (row, terms) in bounds.items()}
    return made.get("starts"), made.get("ends")


class WindowedAttentionRule(Rule):
    name = "windowed_attention"
    op = _op_module.OP_NAME
    anchors = (WS, aten.cat.default)

    def variants(self):
        return ()  # a graph walk from the windowed_softmax op (see the module docstring)

    def apply(self, graph: torch.fx.Graph) -> int:
        if self.verify:  # the windowed softmax feeds its check, not the matmul: nothing to fold
            return 0
        st = stats_for(self.name, self.op)
        matched = 0
        for ws in self.candidates(graph):
            if _is(ws, aten.cat.default) and not _is_sink_cat(ws):
                continue  # any other cat: not counted as a candidate
            st.candidates += 1
            try:
                variant = _match_and_build(graph, ws) if _is(ws, WS) else _match_sink(graph, ws)
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
