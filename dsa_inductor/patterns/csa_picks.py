"""DeepSeek-V4's compressed sparse attention (CSA) as ``dsa_inductor::sparse_attention``: a window and the picks.

Called by the ``windowed_attention`` rule's sink walk (``patterns/windowed_attention.py``) once it has matched
transformers' V4 attention with the mask ``cat([window mask, block_bias], -1)`` over ``cat([kv, compressed_kv])``.
In a CSA layer (transformers' ``DeepseekV4CSACompressor``, DeepSeek-V4 paper section 2.3.1) the block bias holds
the lightning indexer's top-k picks::

    safe = torch.where(top_k_indices >= 0, top_k_indices, compressed_len)                 # [B, S, K]
    block_bias = full((B, 1, S, compressed_len + 1), -inf).scatter_(-1, safe.unsqueeze(1), 0.0)
    block_bias = block_bias[..., :compressed_len]

The windowed kernel reads that bias densely: every query scores all ``Tc`` compressed keys to keep its ``K``
picks.  Here each query's keys become one index list instead,

    [ends - w, ..., ends - 1]  (its window, where inside [0, tail); else -1)  ++  [tail + p  (0 <= p < Tc; else -1)]

and ``sparse_attention`` (one program per query and block of heads, FlashMLA's sparse prefill design) gathers
only those rows of the one K = V head all heads share, with the sink, ``dedup=True`` (the scatter keeps a key
once however often it is picked) and keys outside ``[0, T)`` not attended.  That is the eager mask exactly
when:

* the window has a constant width ``w``: ``row_starts`` and ``row_ends`` are the same node plus integer
  offsets (V4's ``(kv > q - w) & (kv <= q)``), so ``[ends - w, ends)`` is the window;
* the block bias is ``full(-inf or finfo.min).scatter(-1, index, 0)`` (optionally sliced to its first ``Tc``
  keys) with the index laid over its rows (``[B, 1, S, K]``): a picked key gets 0 and every other -inf.  An
  index outside ``[0, Tc)`` is no key (eager's scatter raises for a negative one, which the op ignores);
* K and V are one shared head: ``repeat_kv(x)`` of an ``x`` with one head, or ``x`` broadcast by the matmul;
* the sink is per head (constant over batch and queries) and the scale a Python number.

Otherwise the caller keeps the windowed kernel with the dense ``tail_bias``.  The scores are not rounded to a
16-bit dtype before the softmax as eager's are (the op accumulates in fp32): within the bf16 tolerance.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..lowerings import sparse_attention as _sparse
from .sparse_attention import Reject, _is, _val

aten = torch.ops.aten
prims = torch.ops.prims
SPARSE = torch.ops.dsa_inductor.sparse_attention.default
_LOWS = (float("-inf"), *(torch.finfo(d).min for d in (torch.float32, torch.float16, torch.bfloat16)))


def _one(d) -> bool:
    return statically_known_true(d == 1)


def _eq(a, b) -> bool:
    return statically_known_true(a == b)


def _node(graph, target, args, kwargs=None):
    """A new node with its fake value (the caller holds the fake mode and the insertion point)."""
    kwargs = kwargs or {}
    vals = torch.fx.node.map_arg((args, kwargs), lambda a: a.meta["val"])
    new = graph.call_function(target, args, kwargs)
    new.meta["val"] = target(*vals[0], **vals[1])
    return new


def _affine(node):
    """``node`` as ``base + c`` through integer ``add`` / ``sub``: ``(base, c)``."""
    c = 0
    while _is(node, aten.add.Tensor, aten.sub.Tensor) and isinstance(node.args[1], int) and not node.kwargs:
        c += node.args[1] if _is(node, aten.add.Tensor) else -node.args[1]
        node = node.args[0]
    return node, c


def _same_value(a, b, depth: int = 8) -> bool:
    """``a`` and ``b`` compute the same value: the same node, or the same op on the same arguments (the graph
    may hold two ``unsqueeze`` nodes of one tensor)."""
    if a is b:
        return True
    if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)) or depth == 0:
        return not isinstance(a, torch.fx.Node) and not isinstance(b, torch.fx.Node) and a == b
    if a.op != "call_function" or a.target != b.target or a.kwargs != b.kwargs or len(a.args) != len(b.args):
        return False
    return all(_same_value(x, y, depth - 1) if not isinstance(x, (list, tuple)) else
               isinstance(y, (list, tuple)) and len(x) == len(y) and all(_same_value(i, j, depth - 1)
                                                                        for i, j in zip(x, y))
               for x, y in zip(a.args, b.args))


def window_width(found) -> Optional[int]:
    """The constant width ``row_ends - row_starts`` of ``mask_topk._mask_as_bounds``'s window, or None when it
    is not the same row node plus integer offsets on both sides (or not positive)."""
    _, bounds, _ = found
    if set(bounds) != {"starts", "ends"}:
        return None
    (rs, ts), (re_, te) = bounds["starts"], bounds["ends"]
    (bs, cs), (be, ce) = _affine(rs), _affine(re_)
    sym_s = sorted((s, t.name) for s, t in ts if isinstance(t, torch.fx.Node))
    sym_e = sorted((s, t.name) for s, t in te if isinstance(t, torch.fx.Node))
    if not _same_value(bs, be) or sym_s != sym_e:
        return None
    w = (ce + sum(s * t for s, t in te if isinstance(t, int))) - (cs + sum(s * t for s, t in ts if isinstance(t, int)))
    return w if w >= 1 else None


def scattered_picks(bias) -> Optional[torch.fx.Node]:
    """The scatter's index when ``bias`` (through expands and casts) is ``full(-inf).scatter(-1, index, 0)``,
    optionally sliced to its first keys (``[..., :n]``); else None."""
    cur = bias
    while _is(cur, aten.expand.default, prims.convert_element_type.default):
        cur = cur.args[0]
    if _is(cur, aten.slice.Tensor):
        src, dim, start = cur.args[0], cur.args[1], cur.args[2] if len(cur.args) > 2 else 0
        step = cur.args[4] if len(cur.args) > 4 else 1
        if dim % _val(src).dim() != _val(src).dim() - 1 or start != 0 or step != 1:
            return None
        cur = src
    if not _is(cur, aten.scatter.value) or len(cur.args) != 4:
        return None
    base, dim, index, value = cur.args
    bv, iv = _val(base), _val(index)
    if (dim % bv.dim() != bv.dim() - 1 or value != 0 or not _is(base, aten.full.default)
            or base.args[1] not in _LOWS or iv.dim() != bv.dim()):
        return None
    return index


def _shared_head(x):
    """The one-head ``[B, 1, T, D]`` tensor behind ``x`` [B, H, T, D]: ``x`` itself, or transformers'
    ``repeat_kv`` (``reshape(expand(x[:, :, None], [B, 1, n, T, D]), [B, n, T, D])``); else None."""
    xv = _val(x)
    if xv.dim() != 4:
        return None
    if _one(xv.shape[1]):
        return x
    if not _is(x, aten.reshape.default, aten.view.default):
        return None
    cur = x.args[0]
    if _is(cur, aten.clone.default):
        cur = cur.args[0]
    if not _is(cur, aten.expand.default) or not _is(cur.args[0], aten.unsqueeze.default) or cur.args[0].args[1] != 2:
        return None
    base = cur.args[0].args[0]
    bv = _val(base)
    if bv.dim() != 4 or not _one(bv.shape[1]) or not all(_eq(a, b) for a, b in zip(bv.shape[2:], xv.shape[2:])):
        return None
    return base


def _head_sinks(graph, sinks, q, h):
    """``[H]`` sink logits from the per-row sink source (``[..., 1]`` broadcast to ``[B, H, S, 1]``); Reject when
    they vary along the batch or the queries."""
    sv = _val(sinks)
    shape = [1] * (4 - sv.dim()) + list(sv.shape)
    if len(shape) != 4 or not (_one(shape[0]) and _one(shape[2]) and _one(shape[3])):
        raise Reject("the sink varies along the batch or the queries: sparse_attention takes one per head")
    flat = _node(graph, aten.reshape.default, (sinks, [-1]))
    return flat if _eq(shape[1], h) else _node(graph, aten.expand.default, (flat, [_size(graph, q, 1)]))


def _size(graph, node, dim):
    """``node``'s size at ``dim``: the int, or a ``sym_size`` node for a symbolic one (no raw SymInt in args)."""
    d = _val(node).shape[dim]
    return d if isinstance(d, int) else _node(graph, aten.sym_size.int, (node, dim))


def _index_list(graph, q, ends, w, n_head, index, n_tail):
    """``[B, S, w + K]`` int64 for q ``[B, H, S, D]``: each query's window ``[ends - w, ends)`` (-1 outside
    ``[0, n_head)``), then its picks moved past the window's keys (-1 outside ``[0, n_tail)``)."""
    ev = _val(ends)
    shape = [1] * (3 - ev.dim()) + list(ev.shape)
    if len(shape) != 3 or not _one(shape[1]) or not _eq(shape[2], _val(q).shape[2]):
        raise Reject("the window's bounds vary along the heads: sparse_attention takes one key list per query")
    b, s = _size(graph, q, 0), _size(graph, q, 2)
    e = _node(graph, aten.reshape.default, (ends, [-1, s, 1]))
    e = _node(graph, prims.convert_element_type.default, (e, torch.int64))
    ar = _node(graph, prims.iota.default, (w,), dict(start=-w, step=1, dtype=torch.int64, device=ev.device,
                                                        requires_grad=False))
    win = _node(graph, aten.add.Tensor, (e, ar))
    inside = _node(graph, aten.bitwise_and.Tensor, (_node(graph, aten.ge.Scalar, (win, 0)),
                                                    _node(graph, aten.lt.Scalar, (win, n_head))))
    win = _node(graph, aten.where.ScalarOther, (inside, win, -1))
    win = _node(graph, aten.expand.default, (win, [b, s, w]))
    picks = _node(graph, aten.squeeze.dim, (index, 1))
    picks = _node(graph, prims.convert_element_type.default, (picks, torch.int64))
    valid = _node(graph, aten.bitwise_and.Tensor, (_node(graph, aten.ge.Scalar, (picks, 0)),
                                                   _node(graph, aten.lt.Scalar, (picks, n_tail))))
    moved = _node(graph, aten.add.Tensor, (picks, n_head))
    moved = _node(graph, aten.where.ScalarOther, (valid, moved, -1))
    moved = _node(graph, aten.expand.default, (moved, [b, s, -1]))
    return _node(graph, aten.cat.default, ([win, moved], -1))


def build(graph, q, k, v, user, ends, width, n_head, bias, index, sinks, scale) -> str:
    """Replace ``user`` (the ``[B, H, S, Dv]`` attention output) by ``sparse_attention`` over each query's window
    and picks; ``q``/``k``/``v`` the matmuls' unexpanded ``[B, H, ., .]`` operands, ``ends`` the window's row
    ends (``width`` keys each), ``n_head`` the window part's key count, ``bias`` the block bias over the
    compressed keys and ``index`` its picks (``scattered_picks``), ``sinks`` the per-row sink source.  Raises
    Reject (nothing inserted that stays used) when it does not apply."""
    qv = _val(q)
    if qv.dim() != 4 or not isinstance(scale, (int, float)):
        raise Reject("CSA picks: q is not [B, H, S, D] or the scale is not a number")
    kb, vb = _shared_head(k), _shared_head(v)
    if kb is None or vb is None:
        raise Reject("CSA picks: K or V is not one head shared by all heads")
    iv = _val(index)
    if iv.dim() != 4 or not _one(iv.shape[1]):
        raise Reject("CSA picks: the picks vary along the heads")
    b, h, s, _ = qv.shape
    if not (_eq(iv.shape[2], s) and (_one(iv.shape[0]) or _eq(iv.shape[0], b))):
        # (a scatter index may have fewer rows than the bias; those rows keep no pick)
        raise Reject("CSA picks: the picks' rows are not known to be the queries'")
    q4 = _node(graph, aten.permute.default, (q, [0, 2, 1, 3]))
    k4 = _node(graph, aten.permute.default, (kb, [0, 2, 1, 3]))
    dv = _val(vb).shape[-1]
    v4 = None if vb is kb else _node(graph, aten.permute.default, (vb, [0, 2, 1, 3]))
    if not isinstance(dv, int):  # a symbolic head dim (dynamic shapes): a node that computes it
        dv = _node(graph, aten.sym_size.int, (vb, -1))
    n_tail = _val(bias).shape[-1]
    if not isinstance(n_tail, int):  # a symbolic count of compressed keys: a node that computes it
        n_tail = _node(graph, aten.sym_size.int, (bias, -1))
    idx = _index_list(graph, q, ends, width, n_head, index, n_tail)
    sink = _head_sinks(graph, sinks, q, h)
    out = _node(graph, SPARSE, (q4, k4, v4, idx, None, None, sink, float(scale), dv, _sparse.EMPTY_ZERO, True,
                                _val(user).dtype))
    out = _node(graph, aten.permute.default, (out, [0, 2, 1, 3]))
    if not all(_eq(a, b_) for a, b_ in zip(_val(out).shape, _val(user).shape)):
        raise Reject("CSA picks: the sparse op's output does not have the attention's shape")
    user.replace_all_uses_with(out)
    short = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(qv.dtype, str(qv.dtype))
    return f"sink:window:tail_picks:sparse_attention:{short}"
