"""Rule ``causal_sdpa``: a fused SDPA call whose additive mask is the plain causal mask -> the same kernel
with ``is_causal=True`` and no mask.

The idiom.  transformers' ``DeepseekV32Attention`` forces ``create_causal_mask(..., allow_is_causal_skip=
False)`` (its indexer needs the mask), so its sdpa path always hands SDPA a bool ``[B, 1, S, T]`` mask built
from ``arange``: ``kv_idx <= q_idx``.  Once the short-sequence shortcut (``mask_topk``'s ``scatter -> full``
follow-up: with ``S <= index_topk`` the top-k takes every key) has removed the index mask, what is left is
``causal & ~full(False)``.  On CUDA, ATen's ``scaled_dot_product_attention`` composite turns it into an
additive bias ``where(keep, 0, fill)`` for the cuDNN or efficient kernel, which then reads a ``[S, T]`` bias
for every head (128 heads x 2 MB at S = 1024) and whose mask has to be built first.  SGLang's DSA prefill
runs plain causal attention in that regime (issue 4: "for prefill up to 2048 tokens the top-k selection is
the identity and plain causal attention is faster"); this rule makes the compiled graph do the same.

What is matched (a graph walk from each ``aten._scaled_dot_product_cudnn_attention`` /
``aten._scaled_dot_product_efficient_attention`` node):

* ``attn_bias`` is ``where(keep, 0, fill)`` (or ``where(~keep, fill, 0)``), reaching the op through the
  efficient kernel's alignment pad + slice and broadcasting ``expand``s, each used once (``sparse_attention``'s
  bias walk);
* ``fill`` is -inf, or finite and <= -1024 (``sparse_attention.MIN_FINITE_FILL``; the masking bound is
  stated in that module: a masked key's weight ``exp(s_j + fill - m)`` is exactly 0 in fp32 unless its
  logit exceeds the row's largest kept logit by about ``|fill| - 104``);
* ``keep``, after dropping conjuncts that are constant True (``~full(False)``, ``full(True)``, through
  views), is one ``arange`` comparison ``kv + c_kv <= q + c_q`` (any of ``<=, <, >=, >`` on either side)
  laid out as ``[..., S, T]`` (kv along the last dim, q along the one before), broadcast only over leading
  dims, with ``c_q - c_kv`` exactly 0: key ``j`` is kept by query ``i`` iff ``j <= i``;
* ``S == T`` (provably, also for dynamic shapes): PyTorch's ``is_causal`` is the top-left aligned mask
  ``j <= i`` (``torch.ones(S, T).tril()``), and with equal lengths no alignment question arises.  At
  ``S = T = 1`` (Dynamo specializes it) both sides are ``arange(1) + c``: the comparison of the two constants
  must hold;
* ``dropout_p == 0`` and ``is_causal`` False.

The replacement is the same op with ``attn_bias=None`` and ``is_causal=True``; every output keeps its meaning
(the logsumexp too), and no query row is empty (row ``i`` keeps key 0..i).  Contract: equal to eager
(``testing.attention_mismatch``) wherever the logits at masked (future) positions are finite and within the
masking bound above.  A NaN or +inf logit at a masked position (a non-finite key ``j > i``) turns eager's row
``i`` into NaN through the additive mask (``NaN + fill``, ``inf + -inf``), a future key changing a past
query's output; ``is_causal`` never reads it, as stock SDPA's ``is_causal`` path does not.  Rejections name the reason in
``report()``.  The bias itself becomes dead code unless something else uses it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..report import log, source_location, stats_for
from .common import Rule
from .mask_topk import _iota_offset, _mask_as_bounds
from .sparse_attention import (_FUSED_SDPA, MIN_FINITE_FILL, NEG_INF, Reject, _BIAS_VIEWS, _check_bias_views,
                               _full_value, _fused_sdpa_path, _is, _schema_args, _val)

aten = torch.ops.aten
_NOTS = (aten.bitwise_not.default, aten.logical_not.default)
_ANDS = (aten.bitwise_and.Tensor, aten.logical_and.default)
_VIEWS = (aten.unsqueeze.default, aten.expand.default, aten.reshape.default, aten.view.default,
          aten.select.int, aten.slice.Tensor, aten.squeeze.dim)


def _constant_bool(node) -> Optional[bool]:
    """The value of a bool tensor that is one constant everywhere (``full`` through views and nots), or None."""
    if _is(node, aten.full.default) and _val(node).dtype == torch.bool and isinstance(node.args[1], (bool, int)):
        return bool(node.args[1])
    if _is(node, *_VIEWS):
        return _constant_bool(node.args[0])
    if _is(node, *_NOTS):
        inner = _constant_bool(node.args[0])
        return None if inner is None else not inner
    return None


def _drop_true_conjuncts(keep):
    """``keep`` without ``& x`` terms where x is constant True (a no-op once shapes are checked)."""
    while _is(keep, *_ANDS):
        a, b = keep.args[:2]
        if _constant_bool(b) is True:
            keep = a
        elif _constant_bool(a) is True:
            keep = b
        else:
            break
    return keep


def _strip_leading_broadcast(node):
    """``node`` under ``unsqueeze`` / ``expand`` steps that only add or broadcast dims before the last two."""
    while True:
        val = _val(node)
        if _is(node, aten.unsqueeze.default) and node.args[1] % val.dim() < val.dim() - 2:
            node = node.args[0]
        elif _is(node, aten.expand.default) and all(
                statically_known_true(a == b) for a, b in zip(_val(node.args[0]).shape[-2:], val.shape[-2:])):
            node = node.args[0]
        else:
            return node


def _term_sum(terms):
    total = 0
    for sign, term in terms:
        total = total + sign * (term if isinstance(term, int) else _val(term))
    return total


_COMPARE = {aten.le.Tensor: lambda a, b: a <= b, aten.lt.Tensor: lambda a, b: a < b,
            aten.ge.Tensor: lambda a, b: a >= b, aten.gt.Tensor: lambda a, b: a > b}


def _true_single_comparison(node) -> bool:
    """At S = T = 1 both sides of ``kv OP q`` are ``arange(1) + c`` (all dims 1), so the comparison is between
    two constants: True if it provably holds (the 1 x 1 causal mask keeps its one key)."""
    if not _is(node, *_COMPARE):
        return False
    terms = [_iota_offset(x, 1) for x in node.args[:2]]
    if any(t is None for t in terms):
        return False
    return statically_known_true(_COMPARE[node.target](*(_term_sum(t) for t in terms)))


def _bias_source(bias):
    """``(keep, fill)`` for ``bias`` = ``where(keep, 0, fill)`` / ``where(~keep, fill, 0)``."""
    if not _is(bias, aten.where.self):
        raise Reject(f"the attention bias is {getattr(bias, 'target', bias)}, not where(mask, 0, fill)")
    cond, a, b = bias.args[:3]
    if _full_value(a) == 0 and _full_value(b) is not None:
        return cond, _full_value(b)
    if _full_value(b) == 0 and _full_value(a) is not None and _is(cond, *_NOTS):
        return cond.args[0], _full_value(a)
    raise Reject("the attention bias is a where() that is not where(keep, 0, fill): not a pure masking bias")


def _walk_back(op, bias_arg):
    """From the op's ``attn_bias`` back through the bias views (pad + slice, expands) to its source, checked
    forward by ``sparse_attention``'s bias walk (each step used once, the pad sliced back, no expand over the
    query or key dim)."""
    src = bias_arg
    while _is(src, *_BIAS_VIEWS):
        src = src.args[0]
    found = _fused_sdpa_path(src)
    if found is None or found[1] is not op:
        raise Reject("the attention bias reaches the SDPA op through other views than pad / slice / expand")
    _check_bias_views(src, found[0], set())
    return src


def match_causal(op) -> tuple[dict, str]:
    """Check one fused SDPA node; returns ``(schema args, note)`` or raises ``Reject``."""
    a = _schema_args(op)
    if a["attn_bias"] is None:
        raise Reject("no attention bias")
    if a["is_causal"] is not False:
        raise Reject("is_causal=True already")
    if a["dropout_p"] != 0:
        raise Reject(f"dropout_p = {a['dropout_p']}: a training attention")
    q, k = _val(a["query"]), _val(a["key"])
    if q is None or k is None or q.dim() != 4 or k.dim() != 4:
        raise Reject("q / k are not 4-d [B, H, S|T, D]")
    s, t = q.shape[-2], k.shape[-2]
    if not statically_known_true(s == t):
        raise Reject("query and key lengths are not provably equal (is_causal is the top-left aligned mask)")
    keep, fill = _bias_source(_walk_back(op, a["attn_bias"]))
    if not isinstance(fill, (int, float)) or isinstance(fill, bool) or fill != fill:
        raise Reject(f"the mask fill {fill!r} is not a constant")
    note = ""
    if fill != NEG_INF:
        if not fill <= -MIN_FINITE_FILL:
            raise Reject(f"the mask fill {fill} is neither -inf nor <= -{MIN_FINITE_FILL:g}: masked keys would "
                         "keep a weight")
        note = (f"finite mask fill {fill:g}: masked keys get weight 0 instead of exp(s + fill - max) (0 in fp32 "
                "unless a masked logit exceeds the row's largest kept one by about |fill| - 104)")
    keep = _drop_true_conjuncts(keep)
    kv = _val(keep)
    if kv is None or kv.dtype != torch.bool or kv.dim() < 2 or \
            not statically_known_true(kv.shape[-2] == s) or not statically_known_true(kv.shape[-1] == t):
        raise Reject("the kept-key mask is not a bool [..., S, T] mask")
    keep = _strip_leading_broadcast(keep)
    if _val(keep).dim() < 2:
        raise Reject("the kept-key mask is not laid out as [..., S, T]")
    if statically_known_true(s == 1) and _true_single_comparison(keep):
        return a, note
    found = _mask_as_bounds(keep, row_len=t)
    if found is None:
        raise Reject("the kept-key mask is not one arange comparison (a causal mask built from arange)")
    peels, bounds, rank = found
    if set(bounds) != {"ends"}:
        raise Reject(f"the arange comparison bounds {sorted(bounds)} of each row, not only its end: a window")
    for peel in peels:
        pv, src = _val(peel), _val(peel.args[0])
        if _is(peel, aten.select.int) and peel.args[1] % src.dim() >= src.dim() - 2:
            raise Reject("the causal mask is indexed along its query dim")
        if pv.dim() < 2 or not statically_known_true(pv.shape[-2] == s):
            raise Reject("the causal mask is broadcast along its query dim")
    row, terms = bounds["ends"]
    q_terms = _iota_offset(row, s, dim=-2)  # arange(S) + c along the query dim
    if q_terms is None:
        raise Reject("the per-row side of the causal comparison is not arange(S) along the query dim")
    if not statically_known_true(_term_sum(q_terms) + _term_sum(terms) == 1):
        raise Reject("the causal comparison has an offset (key j kept by query i for j <= i + c, c != 0): "
                     "not the top-left causal mask")
    return a, note


def _set_args(node, values: dict) -> None:
    """Set schema arguments of ``node`` by name, positionally where it passed them so."""
    args, kwargs = list(node.args), dict(node.kwargs)
    names = [x.name for x in node.target._schema.arguments]
    for name, value in values.items():
        i = names.index(name)
        if i < len(args):
            args[i] = value
        else:
            kwargs[name] = value
    node.args, node.kwargs = tuple(args), kwargs


class CausalSdpaRule(Rule):
    name = "causal_sdpa"
    op = "aten fused SDPA with is_causal=True, no attn_bias"
    anchors = tuple(_FUSED_SDPA)

    def variants(self):
        return ()

    def apply(self, graph: torch.fx.Graph) -> int:
        st = stats_for(self.name, self.op)
        done = 0
        for op in self.candidates(graph):
            st.candidates += 1
            try:
                a, note = match_causal(op)
            except Reject as r:
                st.rejections[str(r)] += 1
                log.info("rule %s left %s at %s alone: %s", self.name, op.name, source_location(op), r)
                continue
            _set_args(op, {"attn_bias": None, "is_causal": True})
            st.matches[f"{_FUSED_SDPA[op.target]}:causal_bias"] += 1
            st.locations[source_location(op)] += 1
            if note:
                st.notes[note] += 1
            done += 1
        if done:
            graph.eliminate_dead_code()
            log.info("rule %s: %d match(es)", self.name, done)
        return done

    def diagnose(self, node: torch.fx.Node) -> str:
        return "not a causal-mask SDPA call"
