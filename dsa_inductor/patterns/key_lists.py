"""DeepSeek-V4's windowed attention as ``dsa_inductor::sparse_attention`` over each query's key list.

Called by the ``windowed_attention`` rule's sink walk (``patterns/windowed_attention.py``) once it has matched
transformers' V4 ``eager_attention_forward``: one K = V head shared by all heads (``repeat_kv``), an additive
window mask, the per-head sink.  The windowed kernel takes tiles of query rows of one head, so every head
re-reads the shared keys and, in the compressed layers, scores every compressed key.  Here each query gets one
index list, shared by its heads:

    [ends - w, ..., ends - 1]  (its window; -1 where outside [0, tail))
    ++ tail part: CSA  [tail + p for the indexer's picks p]          (-1 where p is outside [0, Tc))
                  HCA  [tail + j for j in [0, Tc)]                   (-1 outside the causal block bounds)
                  decode (V4 pads the window's mask with zeros)  [tail + j for j in [0, Tc)]

and ``sparse_attention`` (one program per query and block of heads, FlashMLA's sparse prefill design: each
gathered key tile is loaded once for all the block's heads) attends over those keys with the sink and
``dedup=True``; keys outside ``[0, T)`` are not attended.  In the CSA layers (transformers'
``DeepseekV4CSACompressor``, DeepSeek-V4 paper section 2.3.1) the block bias is::

    safe = torch.where(top_k_indices >= 0, top_k_indices, compressed_len)                 # [B, S, K]
    block_bias = full((B, 1, S, compressed_len + 1), -inf).scatter_(-1, safe.unsqueeze(1), 0.0)
    block_bias = block_bias[..., :compressed_len]

The list is the eager mask exactly when:

* the window has a constant width ``w``: ``row_starts`` and ``row_ends`` are the same value plus integer
  offsets (V4's ``(kv > q - w) & (kv <= q)`` with the config's ``sliding_window``), so ``[ends - w, ends)`` is
  the window; a symbolic width (a dynamic ``w``) keeps the windowed kernel;
* a CSA block bias is ``full(-inf or finfo.min).scatter(-1, index, 0)`` (optionally sliced to its first ``Tc``
  keys) with one index row per query (``[B, 1, S, K]``): a picked key gets 0, every other -inf, and a key picked
  twice is one key (``dedup``).  An index outside ``[0, Tc)`` is no key (eager's scatter raises for a negative
  one, which the op ignores).  Any other tail bias keeps the windowed kernel;
* the bounds and the picks do not vary along the heads, the sink is per head (constant over batch and
  queries) and the scale a Python number.

The scores are not rounded to a 16-bit dtype before the softmax as eager's are (the op accumulates in fp32):
within the bf16 tolerance (transformers' bf16 V4 stays as close to eager as stock ``torch.compile``).
Measured on an H100 at V4-Flash's shape (B = 1, 64 heads, S = 4096, head dim 512, w = 128, bf16): the CSA layer
1582 us against 6495 us with the dense tail and 12301 us stock; the key lists of the sliding layer alone 484-537
us against the windowed kernel's 753 us (``bench/tune_sparse_attention.py --v4``).
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..lowerings import sparse_attention as _sparse
from .mask_topk import _new_node as _node
from .sparse_attention import MASKED_FILLS, Reject, _is, _val

aten = torch.ops.aten
prims = torch.ops.prims
SPARSE = torch.ops.dsa_inductor.sparse_attention.default


def _one(d) -> bool:
    return statically_known_true(d == 1)


def _eq(a, b) -> bool:
    return statically_known_true(a == b)


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
            or base.args[1] not in MASKED_FILLS or iv.dim() != bv.dim()):
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


def _part(graph, keys, valid, offset):
    """``where(valid, keys + offset, -1)`` as int64."""
    keys = _node(graph, prims.convert_element_type.default, (keys, torch.int64))
    moved = _node(graph, aten.add.Tensor, (keys, offset)) if not (isinstance(offset, int) and offset == 0) else keys
    return _node(graph, aten.where.ScalarOther, (valid, moved, -1))


def _in_range(graph, keys, lo, hi):
    """``(keys >= lo) & (keys < hi)`` (``lo`` / ``hi`` numbers, SymInt nodes or tensors [B, S, 1])."""
    ge = aten.ge.Tensor if isinstance(lo, torch.fx.Node) and isinstance(_val(lo), torch.Tensor) else aten.ge.Scalar
    lt = aten.lt.Tensor if isinstance(hi, torch.fx.Node) and isinstance(_val(hi), torch.Tensor) else aten.lt.Scalar
    return _node(graph, aten.bitwise_and.Tensor, (_node(graph, ge, (keys, lo)), _node(graph, lt, (keys, hi))))


def _per_query(graph, q, bound):
    """A row bound laid over ``[B, H, S]`` as ``[B or 1, S, 1]``; Reject when it varies along the heads."""
    bv = _val(bound)
    shape = [1] * (3 - bv.dim()) + list(bv.shape)
    if len(shape) != 3 or not _one(shape[1]) or not _eq(shape[2], _val(q).shape[2]):
        raise Reject("the bounds vary along the heads: sparse_attention takes one key list per query")
    return _node(graph, aten.reshape.default, (bound, [-1, _size(graph, q, 2), 1]))


def _index_list(graph, q, ends, w, n_head, tail, n_tail):
    """``[B, S, w (+ tail keys)]`` int64 for q ``[B, H, S, D]``: each query's window ``[ends - w, ends)`` (-1
    outside ``[0, n_head)``), then its tail keys moved past the window's (``tail``: None, ``("picks", index)``
    with -1 outside ``[0, n_tail)``, or ``("bounds", starts, ends)``: tail key j where starts <= j < ends, either
    bound None)."""
    b, s = _size(graph, q, 0), _size(graph, q, 2)
    e = _per_query(graph, q, ends)
    e = _node(graph, prims.convert_element_type.default, (e, torch.int64))
    dev = _val(q).device
    ar = _node(graph, prims.iota.default, (w,), dict(start=-w, step=1, dtype=torch.int64, device=dev,
                                                        requires_grad=False))
    win = _node(graph, aten.add.Tensor, (e, ar))
    parts = [_node(graph, aten.expand.default, (_part(graph, win, _in_range(graph, win, 0, n_head), 0), [b, s, w]))]
    if tail is not None and tail[0] == "picks":
        picks = _node(graph, aten.squeeze.dim, (tail[1], 1))
        part = _part(graph, picks, _in_range(graph, picks, 0, n_tail), n_head)
        parts.append(_node(graph, aten.expand.default, (part, [b, s, -1])))
    elif tail is not None:
        j = _node(graph, prims.iota.default, (n_tail,), dict(start=0, step=1, dtype=torch.int64, device=dev,
                                                              requires_grad=False))
        lo = _per_query(graph, q, tail[1]) if tail[1] is not None else 0
        hi = _per_query(graph, q, tail[2]) if tail[2] is not None else n_tail
        valid = _in_range(graph, _node(graph, aten.expand.default, (j, [1, 1, n_tail])), lo, hi)
        parts.append(_node(graph, aten.expand.default, (_part(graph, j, valid, n_head), [b, s, n_tail])))
    return parts[0] if len(parts) == 1 else _node(graph, aten.cat.default, (parts, -1))


def build(graph, q, k, v, user, ends, width, n_head, tail, sinks, scale) -> str:
    """Replace ``user`` (the ``[B, H, S, Dv]`` attention output) by ``sparse_attention`` over each query's key
    list; ``q``/``k``/``v`` the matmuls' unexpanded ``[B, H, ., .]`` operands, ``ends`` the window's row ends
    (``width`` keys each), ``n_head`` the window part's key count (all keys without a tail), ``tail`` None,
    ``("picks", bias, scattered_picks(bias))`` (not None) or ``("bounds", tail_starts, tail_ends)``, ``sinks``
    the per-row sink source.  Returns the variant name; raises Reject (nothing inserted stays used) when it does
    not apply."""
    qv = _val(q)
    if qv.dim() != 4 or not isinstance(scale, (int, float)):
        raise Reject("q is not [B, H, S, D] or the scale is not a number")
    kb, vb = _shared_head(k), _shared_head(v)
    if kb is None or vb is None:
        raise Reject("K or V is not one head shared by all heads")
    b, h, s, _ = qv.shape
    if n_head is None:  # no tail: the window spans all keys
        n_head = _size(graph, kb, 2)
    if tail is not None and tail[0] == "picks":
        index = tail[2]
        iv = _val(index)
        if iv.dim() != 4 or not _one(iv.shape[1]):
            raise Reject("the picks vary along the heads")
        if not (_eq(iv.shape[2], s) and (_one(iv.shape[0]) or _eq(iv.shape[0], b))):
            # (a scatter index may have fewer rows than the bias; those rows keep no pick)
            raise Reject("the picks' rows are not known to be the queries'")
        n_tail = _size(graph, tail[1], -1)
        tail = ("picks", index)
    elif tail is not None:  # the keys after the window's: T - n_head
        n_tail = _val(kb).shape[2] - (_val(n_head) if isinstance(n_head, torch.fx.Node) else n_head)
        if not isinstance(n_tail, int):
            n_tail = _node(graph, operator.sub, (_size(graph, kb, 2), n_head))
    else:
        n_tail = None
    q4 = _node(graph, aten.permute.default, (q, [0, 2, 1, 3]))
    k4 = _node(graph, aten.permute.default, (kb, [0, 2, 1, 3]))
    v4 = None if vb is kb else _node(graph, aten.permute.default, (vb, [0, 2, 1, 3]))
    idx = _index_list(graph, q, ends, width, n_head, tail, n_tail)
    sink = _head_sinks(graph, sinks, q, h)
    out = _node(graph, SPARSE, (q4, k4, v4, idx, None, None, sink, float(scale), _size(graph, vb, -1),
                                _sparse.EMPTY_ZERO, True, _val(user).dtype))
    out = _node(graph, aten.permute.default, (out, [0, 2, 1, 3]))
    if not all(_eq(a, b_) for a, b_ in zip(_val(out).shape, _val(user).shape)):
        raise Reject("the sparse op's output does not have the attention's shape")
    user.replace_all_uses_with(out)
    short = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(qv.dtype, str(qv.dtype))
    kind = "" if tail is None else "tail_picks:" if tail[0] == "picks" else "tail_keys:"
    return f"sink:window:{kind}key_list:sparse_attention:{short}"
