"""Rule ``sparse_attention``: attention restricted to top-k keys -> ``dsa_inductor::sparse_attention``.

Two eager forms (DeepSeek-V3.2 DSA, arXiv 2512.02556; transformers' ``DeepseekV32Attention``; FlashMLA's
sparse prefill reference; DeepSeek-V4's attention sink):

**Dense-mask form** (transformers' eager and sdpa paths, CPU and CUDA)::

    index_mask = ones(B, S, T, dtype=bool).scatter(-1, topk_indices, False)[:, None]   # True = not selected
    keep = causal & ~index_mask                                 # sdpa: bool mask
    bias = float_causal.masked_fill(index_mask, finfo.min)      # eager: additive 0 / finfo.min mask
    out = softmax(q @ k^T * scale + bias or masked by keep, -1, dtype=float32).to(q.dtype) @ v

The dense ``[B, H, S, T]`` product around it varies with the device, the SDPA backend and the layout
(``matmul`` -> expand/reshape/bmm with or without ``clone``, SDPA's math decomposition scales q and k by
``sqrt(scale)`` each and adds a safe softmax), so this form is matched by walking the graph from the
``aten.scatter`` anchor rather than by one traced pattern per spelling:

* the scattered base must be ``full(True)`` and the scattered value ``False`` (a mask scattered with
  True is not a selection), along the last dim;
* the mask joins the scores as ``where(keep, 0, -inf)`` added (SDPA's math path), ``masked_fill(~keep,
  -inf)``, ``masked_fill(index_mask, -inf)``, or the eager ``where(index_mask, finfo.min, where(causal,
  0, finfo.min))`` added; the other conjunct (the causal mask) becomes the op's ``keep_mask``, then
  ``row_ends`` when it is an ``arange`` comparison (no mask read at all);
* the softmax is over the last dim, and no intermediate (scores, weights) has a use outside the idiom;
* ``q`` is ``[B, H, S, D]``; ``k``/``v`` are per-head ``[B, H, T, *]`` or one latent expanded over the
  heads (``expand`` / ``repeat_kv``), and ``v`` a leading slice of the latent is MLA (``v = kv[..., :dv]``);
* or, on CUDA, SDPA hands the mask to a fused kernel as an additive bias (ATen's ``scaled_dot_product_attention``
  composite): ``where(keep, 0, fill)`` (``where(~keep, fill, 0)`` in older torch), for the efficient kernel
  padded to a multiple of 8 keys, sliced back and expanded over the heads, is the ``attn_bias`` of
  ``aten._scaled_dot_product_cudnn_attention`` (fill -65504 from ``convert_boolean_attn_mask_cudnn``, -65536
  once rounded to bf16) or ``aten._scaled_dot_product_efficient_attention`` (fill -inf); only the op's
  attention output [0] is used (a used logsumexp means a training graph: left alone), ``dropout_p`` is 0 and
  ``is_causal`` False; q/k/v are the op's ``[B, H, S|T, D]`` arguments and the scale its ``scale`` (default
  ``1/sqrt(Dqk)``).  Variants ``dense_mask:<layout>:sdpa_cudnn`` / ``sdpa_efficient``.

A row with no valid key is what the matched graph computes: NaN for ``-inf`` masking, 0 under SDPA's
safe softmax, the mean of ``v`` for a ``finfo.min`` fill (eager's weights are then uniform over T).

Fused SDPA masking.  A -inf fill drops a masked key exactly.  A finite fill ``f`` (cuDNN's) gives it the
weight ``exp(s_j + f - m)`` with ``m`` at least the row's largest kept logit: exactly 0 in fp32 unless a masked
logit exceeds the largest kept logit of its row by more than about ``|f| - 104`` (``|f| - 88`` where the kernel
flushes denormals), some 65400 for cuDNN's fill; fills above -1024 are not taken as masking.  A query with no
kept key gets 0 (``EMPTY_ZERO``): SDPA's convention for a fully masked row, and what the efficient kernel
computes with -inf (pytorch PR #133882).  With a finite fill eager differs on such a row: the kernel's
softmax over the row's T logits, all shifted by the same ``f``, is the unmasked attention over all T keys
(uniform once ``f`` absorbs the logits, as ``finfo.min`` does); ``report()`` notes each such match.  In
DeepSeek-V3.2 such rows occur only where the causal/padding mask keeps no key at all (left padding: outputs
nobody reads), since the indexer masks the same keys before its top-k.  cuDNN with a -inf fill is left alone:
its result for a fully masked row depends on the cuDNN version (NaN or 0).
The dense mask holds each key once; unless ``topk_indices`` come straight from a ``topk`` (or the fused
``masked_topk``), whose indices are distinct, the op is told to count repeated indices once (``dedup``).
With per-head ``k``/``v`` (transformers' eager path expands MLA per head) ``dedup`` is always on: exact for
the dense mask either way, and on CUDA it selects the op's masked flash kernel (dense key tiles shared by a
block of queries, a selection bitmask) instead of a per-(query, head) gather.

**Gather form** (reference code and tests), traced search variants (``patterns/common.py``)::

    sel = kv[arange(B)[:, None, None], topk_indices]            # or kv[topk_indices] without a batch dim;
                                                                # B == 1 static is a variant of its own
    scores = einsum("bshd,bskd->bshk", q, sel) * scale          # or q @ sel.transpose(-1, -2)
    scores = scores.masked_fill((topk_indices == -1)[:, :, None], -inf)   # or topk_indices < 0
    out = einsum("bshk,bskd->bshd", softmax(scores, -1, dtype=float32).to(q.dtype), sel[..., :dv])

with an optional sink: ``softmax(cat([scores, sink]))[..., :-1]`` or the additive form
``e = exp(scores - m); e / (e.sum(-1) + exp(sink - m))`` with ``m = max(amax(scores), sink)``.  Eager's
``kv[-2]`` wraps around, so for the ``== -1`` spelling the replacement maps other negative indices to
``idx + T`` first; repeated indices count twice, as in eager.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
from typing import Callable, Optional

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..lowerings import sparse_attention as _op_module
from ..report import log, source_location, stats_for
from ..canonicalize import trace_joint
from .common import Rule, Variant, tensor_meta
from .mask_topk import _bound_node, _mask_as_bounds, _new_node

aten = torch.ops.aten
prims = torch.ops.prims
NEG_INF = float("-inf")
SCALE_MAGIC = 0.4321
DV_MAGIC = 37
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_MINS = {torch.finfo(d).min for d in _FLOATS}
MASKED_FILLS = {NEG_INF, *_MINS}  # the conventional "masked" constants of additive masks: -inf or a finfo.min
OP = torch.ops.dsa_inductor.sparse_attention.default


# ---------------------------------------------------------------------------------------------------------
# Gather form: traced variants
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GatherForm:
    name: str
    batched: bool
    contraction: str  # "einsum" | "matmul"
    invalid: str  # "eq" (idx == -1) | "lt" (idx < 0)
    sink: str  # "" | "cat" | "additive"
    dtype: torch.dtype  # example dtype: fp32 softmax in place, or half with softmax(dtype=float32).to(dtype)
    bs1: bool = False  # batched, traced at batch 1: Dynamo specializes B == 1 and einsum folds it away


def _gather_search(form: GatherForm):
    def search(*args):
        if form.sink:
            q, kv, idx, sink, scale, dv = args
        else:
            q, kv, idx, scale, dv = args
        if form.batched:
            sel = kv[torch.arange(q.shape[0], device=q.device)[:, None, None], idx]
        else:
            sel = kv[idx]
        if form.contraction == "einsum":
            eq = "bshd,bskd->bshk" if form.batched else "shd,skd->shk"
            scores = torch.einsum(eq, q, sel) * scale
        else:
            scores = torch.matmul(q, sel.transpose(-1, -2)) * scale
        bad = (idx == -1) if form.invalid == "eq" else (idx < 0)
        scores = scores.masked_fill(bad.unsqueeze(-2), NEG_INF)
        if form.sink == "cat":
            s4 = sink.reshape(*([1] * (scores.dim() - 2)), -1, 1).expand(*scores.shape[:-1], 1)
            p = torch.softmax(torch.cat([scores, s4], dim=-1), dim=-1, dtype=torch.float32)[..., :-1]
        elif form.sink == "additive":
            s4 = sink.reshape(*([1] * (scores.dim() - 2)), -1, 1)
            m = torch.maximum(scores.amax(dim=-1, keepdim=True), s4)
            e = torch.exp(scores - m)
            p = e / (e.sum(dim=-1, keepdim=True) + torch.exp(s4 - m))
        else:
            p = torch.softmax(scores, dim=-1, dtype=torch.float32)
        if form.dtype != torch.float32:
            p = p.to(q.dtype)
        vsel = sel[..., :dv]
        if form.contraction == "einsum":
            eq = "bshk,bskd->bshd" if form.batched else "shk,skd->shd"
            return torch.einsum(eq, p, vsel)
        return torch.matmul(p, vsel)

    return search


def _gather_replace(form: GatherForm):
    def replace(*args):
        if form.sink:
            q, kv, idx, sink, scale, dv = args
        else:
            (q, kv, idx, scale, dv), sink = args, None
        if not form.batched:
            q, kv, idx = q.unsqueeze(0), kv.unsqueeze(0), idx.unsqueeze(0)
        if form.invalid == "eq":  # eager's kv[-2] wraps around; only -1 is masked
            idx = torch.where((idx < 0) & (idx != -1), idx + kv.shape[1], idx)
        out = torch.ops.dsa_inductor.sparse_attention(
            q, kv.unsqueeze(2), None, idx, None, None, sink, scale, dv, _op_module.EMPTY_NAN, False, q.dtype)
        return out if form.batched else out.squeeze(0)

    return replace


def _gather_variant(form: GatherForm) -> Variant:
    argnames = ("q", "kv", "topk_indices") + (("attn_sink",) if form.sink else ()) + ("scale", "dv")

    def example_inputs():
        b, s, h, d, t, k = (1 if form.bs1 else 2), 3, 4, 40, 11, 5
        dt = form.dtype
        q = torch.empty(b, s, h, d, dtype=dt) if form.batched else torch.empty(s, h, d, dtype=dt)
        kv = torch.empty(b, t, d, dtype=dt) if form.batched else torch.empty(t, d, dtype=dt)
        idx = torch.empty(b, s, k, dtype=torch.int64) if form.batched else torch.empty(s, k, dtype=torch.int64)
        sink = [torch.empty(h, dtype=dt)] if form.sink else []  # the sink in the model dtype
        return [q, kv, idx, *sink, SCALE_MAGIC, DV_MAGIC]

    name = (f"gather{'_bs1' if form.bs1 else '' if form.batched else '_unbatched'}:{form.contraction}:{form.invalid}"
            f"{':sink_' + form.sink if form.sink else ''}:{'fp32' if form.dtype == torch.float32 else 'half'}")
    return Variant(name, argnames, _gather_search(form), _gather_replace(form), example_inputs,
                   {"scale": SCALE_MAGIC, "dv": DV_MAGIC}, check=_gather_check, trace=trace_joint)


def _gather_check(match) -> Optional[str]:
    q, kv, idx = (tensor_meta(match, n) for n in ("q", "kv", "topk_indices"))
    if q is None or kv is None or idx is None:
        return "q / kv / topk_indices are not tensors"
    if q.dtype not in _FLOATS or kv.dtype != q.dtype:
        return f"q {q.dtype} / kv {kv.dtype}: not one float dtype"
    if idx.dtype not in (torch.int32, torch.int64):
        return f"topk_indices dtype {idx.dtype} is not int32/int64"
    sink = tensor_meta(match, "attn_sink")
    if sink is not None and (sink.dim() != 1 or not statically_known_true(sink.shape[0] == q.shape[-2])):
        return f"attn_sink {tuple(sink.shape)} is not one logit per head"
    return None


def gather_variants():
    forms = []
    for (batched, bs1), contraction, invalid, sink, dt in itertools.product(
            ((True, False), (True, True), (False, False)), ("einsum", "matmul"), ("eq", "lt"),
            ("", "cat", "additive"), (torch.float32, torch.bfloat16)):
        if sink == "additive" and dt != torch.float32:
            continue  # the additive sink form is written on fp32 scores
        forms.append(GatherForm(f"{batched}", batched, contraction, invalid, sink, dt, bs1))
    return [_gather_variant(f) for f in forms]


# ---------------------------------------------------------------------------------------------------------
# Dense-mask form: graph walk from aten.scatter
# ---------------------------------------------------------------------------------------------------------

class Reject(Exception):
    """The candidate is left alone; the message is the reason recorded in the report."""


def _is(node, *targets):
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _only_user(node, nodes):
    users = list(node.users)
    if len(users) != 1:
        raise Reject(f"{node.name} has {len(users)} users: an intermediate of the attention is used elsewhere "
                     "(e.g. the attention weights)")
    nodes.add(users[0])
    return users[0]


def _full_value(node):
    if _is(node, aten.full.default) and not _val(node).shape:
        return node.args[1]
    return None


def _strip_view_chain(node, nodes):
    """Peel the matmul decomposition's ``reshape(clone(expand(x)))`` above a bmm operand."""
    if _is(node, aten.reshape.default):
        nodes.add(node)
        node = node.args[0]
    if _is(node, aten.clone.default):
        nodes.add(node)
        node = node.args[0]
    if _is(node, aten.expand.default):
        nodes.add(node)
        node = node.args[0]
    return node


def _scalar_factor(node):
    """``x * c`` / ``x / c`` with a Python number c -> (x, factor); else (node, 1.0)."""
    if _is(node, aten.mul.Tensor, aten.mul.Scalar) and isinstance(node.args[1], (int, float)):
        return node.args[0], float(node.args[1])
    if _is(node, aten.div.Tensor, aten.div.Scalar) and isinstance(node.args[1], (int, float)) and node.args[1]:
        return node.args[0], 1.0 / float(node.args[1])
    return node, 1.0


def _peel_heads(node):
    """A ``[B, H, T, D]`` operand that is one head expanded (``expand`` or ``repeat_kv``) -> ``[B, 1, T, D]``."""
    val = _val(node)
    if _is(node, aten.reshape.default):  # repeat_kv: reshape(expand(x[:, :, None], [B, Hk, rep, T, D]))
        inner = node.args[0]
        if _is(inner, aten.expand.default) and _is(inner.args[0], aten.unsqueeze.default) and \
                inner.args[0].args[1] == 2:
            src = inner.args[0].args[0]
            sv = _val(src)
            if sv is not None and sv.dim() == 4 and statically_known_true(sv.shape[1] == 1):
                return src
    if _is(node, aten.expand.default):
        src = node.args[0]
        sv = _val(src)
        if sv is not None and sv.dim() == 4 and statically_known_true(sv.shape[1] == 1) and val is not None:
            return src
    return node


def _index_provenance_unique(idx) -> bool:
    """Are the indices a topk's (distinct by construction), through integer casts?"""
    node = idx
    while _is(node, prims.convert_element_type.default):
        node = node.args[0]
    if _is(node, operator.getitem) and node.args[1] == 1:
        src = node.args[0]
        return _is(src, aten.topk.default, torch.ops.dsa_inductor.masked_topk.default)
    return False


@dataclasses.dataclass
class DenseMatch:
    scatter: torch.fx.Node
    idx: torch.fx.Node
    causal: Optional[torch.fx.Node]  # bool keep mask joined with the index mask, or None
    scores: torch.fx.Node  # the [B, H, S, T] logits before masking (already scaled, unless folded)
    empty_row: int
    out: torch.fx.Node  # [B, H, S, Dv]
    q: torch.fx.Node = None
    k: torch.fx.Node = None
    v: torch.fx.Node = None
    scale: float = 1.0
    nodes: set = dataclasses.field(default_factory=set)
    form: str = ""  # the variant's last part when it is not the empty-row convention (the fused SDPA forms)
    sdpa: Optional[torch.fx.Node] = None  # the fused SDPA op the match replaces (erased after the rewrite)
    note: str = ""  # a caveat for report()


def _peel_broadcast(node):
    """The mask under ``unsqueeze``/``expand``/dtype casts that only add or broadcast leading dims."""
    top = _val(node)
    cur = node
    while _is(cur, aten.unsqueeze.default, aten.expand.default, prims.convert_element_type.default):
        cur = cur.args[0]
    cv = _val(cur)
    if cur is node or cv is None or top is None or cv.dim() < 2:
        return node
    if all(statically_known_true(a == b) for a, b in zip(cv.shape[-2:], top.shape[-2:])):
        return cur
    return node


def _match_dense(sc: torch.fx.Node) -> DenseMatch:
    nodes = {sc}
    base, dim, idx, value = sc.args[:4]
    if not _is(base, aten.full.default):
        raise Reject("scatter base is not a full() mask")
    if base.args[1] is not True or _val(base).dtype != torch.bool:
        raise Reject(f"scatter base is full({base.args[1]}) rather than ones(bool): not a selection mask")
    if value is not False:
        raise Reject(f"the mask is scattered with {value!r} rather than False: not 'True = not selected'")
    rank = _val(sc).dim()
    if dim not in (-1, rank - 1) or rank != 3:
        raise Reject(f"scatter along dim {dim} of a {rank}-d mask, not the key dim of [B, S, T]")
    drop = sc
    user = _only_user(drop, nodes)
    if _is(user, aten.unsqueeze.default) and user.args[1] == 1:
        drop = user
        user = _only_user(drop, nodes)
    causal, fill, empty_row = None, NEG_INF, _op_module.EMPTY_NAN
    if _is(user, aten.bitwise_not.default, aten.logical_not.default):  # keep = [causal &] ~index_mask
        keep = user
        nxt = _only_user(keep, nodes)
        if _is(nxt, aten.bitwise_and.Tensor, aten.logical_and.default):
            other = nxt.args[0] if nxt.args[1] is keep else nxt.args[1]
            if _val(other) is None or _val(other).dtype != torch.bool:
                raise Reject("the index mask is joined with a non-bool mask")
            causal, keep = other, nxt
            nxt = _only_user(keep, nodes)
        if _is(nxt, aten.unsqueeze.default) and nxt.args[1] == 1 and _val(keep).dim() == 3:
            keep = nxt  # (causal & ~index_mask)[:, None]
            nxt = _only_user(keep, nodes)
        if _is(nxt, aten.where.self) and nxt.args[0] is keep:
            if _full_value(nxt.args[1]) == 0 and _fused_sdpa_path(nxt) is not None:  # CUDA SDPA: where(keep, 0, fill)
                return _match_fused_sdpa(DenseMatch(sc, idx, causal, None, _op_module.EMPTY_ZERO, None, nodes=nodes),
                                         nxt, _full_value(nxt.args[2]))
            if _full_value(nxt.args[1]) == 0 and _full_value(nxt.args[2]) == NEG_INF:  # additive 0 / -inf
                add = _only_user(nxt, nodes)
                if not _is(add, aten.add.Tensor):
                    raise Reject("the 0/-inf mask is not added to the scores")
                scores = add.args[0] if add.args[1] is nxt else add.args[1]
                logits = add
            elif _full_value(nxt.args[2]) == NEG_INF and isinstance(nxt.args[1], torch.fx.Node):
                scores, logits = nxt.args[1], nxt  # where(keep, scores, -inf)
            else:
                raise Reject("the keep mask is used by a where() that is not a -inf masking")
        elif _is(nxt, aten.bitwise_not.default, aten.logical_not.default):  # masked_fill(~keep, -inf)
            w = _only_user(nxt, nodes)
            if _is(w, aten.where.self) and w.args[0] is nxt and _full_value(w.args[2]) == 0 and \
                    _fused_sdpa_path(w) is not None:  # CUDA SDPA, older spelling: where(~keep, fill, 0)
                return _match_fused_sdpa(DenseMatch(sc, idx, causal, None, _op_module.EMPTY_ZERO, None, nodes=nodes),
                                         w, _full_value(w.args[1]))
            if not (_is(w, aten.where.self) and w.args[0] is nxt and _full_value(w.args[1]) == NEG_INF):
                raise Reject("~keep does not feed a masked_fill(-inf)")
            scores, logits = w.args[2], w
        else:
            raise Reject(f"the keep mask feeds {getattr(nxt, 'target', nxt)}, not a masked softmax attention")
    elif _is(user, aten.where.self) and user.args[0] is drop:
        f = _full_value(user.args[1])
        if f == NEG_INF and isinstance(user.args[2], torch.fx.Node) and _val(user.args[2]).dim() == 4 and \
                not _is(user.args[2], aten.where.self):
            scores, logits = user.args[2], user  # scores.masked_fill(index_mask, -inf)
        elif f in _MINS or f == NEG_INF:  # eager: float_mask.masked_fill(index_mask, fill) added to scores
            base_mask = _peel_broadcast(user.args[2])
            if not (_is(base_mask, aten.where.self) and _full_value(base_mask.args[1]) == 0 and
                    _full_value(base_mask.args[2]) == f):
                raise Reject("the float attention mask is not where(bool, 0, fill) with the same fill: an "
                             "arbitrary additive bias is not reproduced")
            causal, fill = base_mask.args[0], f
            add = _only_user(user, nodes)
            if not _is(add, aten.add.Tensor):
                raise Reject("the float mask is not added to the scores")
            scores = add.args[0] if add.args[1] is user else add.args[1]
            logits = add
            if f != NEG_INF:
                empty_row = _op_module.EMPTY_UNIFORM
        else:
            raise Reject(f"masked_fill value {f} is neither -inf nor a finfo.min")
    else:
        raise Reject(f"the index mask feeds {getattr(user, 'target', user)}, not a masked attention")
    m = DenseMatch(sc, idx, causal, scores, empty_row, None, nodes=nodes)
    _match_softmax_and_pv(m, logits)
    _match_scores(m)
    return m


# The CUDA fused SDPA ops that take an additive mask (flash takes none) -> variant name
_FUSED_SDPA = {aten._scaled_dot_product_cudnn_attention.default: "sdpa_cudnn",
               aten._scaled_dot_product_efficient_attention.default: "sdpa_efficient"}
_BIAS_VIEWS = (aten.expand.default, aten.constant_pad_nd.default, aten.slice.Tensor)
MIN_FINITE_FILL = 1024.0  # |fill| below this is not taken as masking (see the module docstring's bound)


def _schema_args(node) -> dict:
    """A call's arguments by schema name, defaults filled in."""
    out = {}
    for i, a in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        else:
            out[a.name] = a.default_value if a.has_default_value() else None
    return out


def _fused_sdpa_path(bias):
    """``(views, op)``: the fused SDPA op that takes ``bias`` as its ``attn_bias`` through ``views`` (pads,
    slices, expands; any number of users on the way), or None."""
    views, cur = [], bias
    for _ in range(4):
        for u in cur.users:
            if u.target in _FUSED_SDPA and _schema_args(u)["attn_bias"] is cur:
                return views, u
        nxt = [u for u in cur.users if _is(u, *_BIAS_VIEWS)]
        if len(nxt) != 1:
            return None
        views.append(nxt[0])
        cur = nxt[0]
    return None


def _check_bias_views(bias, views, nodes):
    """The bias reaches the op unchanged: ``constant_pad_nd(x, [0, p])`` sliced back to ``[..., :T]``
    (the efficient kernel's alignment pad), and broadcasting ``expand``s; each step used once."""
    cur, i = bias, 0
    while i < len(views):
        _only_user(cur, nodes)
        node, cv = views[i], _val(cur)
        if _is(node, aten.expand.default):
            nv = _val(node)
            if not all(statically_known_true(a == b) for a, b in zip(cv.shape[-2:], nv.shape[-2:])):
                raise Reject("the attention bias is expanded over the query or key dim")
        elif _is(node, aten.constant_pad_nd.default) and i + 1 < len(views) and \
                _is(views[i + 1], aten.slice.Tensor) and len(node.args[1]) == 2 and node.args[1][0] == 0:
            _only_user(node, nodes)
            sl = _schema_args(views[i + 1])
            end = _val(sl["end"]) if isinstance(sl["end"], torch.fx.Node) else sl["end"]  # a SymInt's node
            if sl["dim"] not in (-1, cv.dim() - 1) or sl["start"] not in (None, 0) or sl["step"] != 1 or \
                    end is None or not statically_known_true(end == cv.shape[-1]):
                raise Reject("the padded attention bias is not sliced back to its key length")
            node, i = views[i + 1], i + 1
        else:
            raise Reject(f"the attention bias goes through {node.target} before the SDPA op")
        cur, i = node, i + 1
    _only_user(cur, nodes)
    return cur


def _match_fused_sdpa(m: DenseMatch, bias, fill) -> DenseMatch:
    """The keep mask as CUDA SDPA's additive mask: ``where(keep, 0, fill)`` -> ``attn_bias`` of a cuDNN or
    efficient attention op (see the module docstring for the fills taken and a row with no kept key)."""
    nodes = m.nodes
    nodes.add(bias)
    views, op = _fused_sdpa_path(bias)
    kind = _FUSED_SDPA[op.target]
    _check_bias_views(bias, views, nodes)
    nodes.update(views)
    a = _schema_args(op)
    if a["dropout_p"] != 0:
        raise Reject(f"fused SDPA with dropout_p = {a['dropout_p']}: random, not an inference attention")
    if a["is_causal"] is not False:
        raise Reject("fused SDPA with is_causal=True on top of the mask")
    if a.get("return_debug_mask"):
        raise Reject("fused SDPA returns its debug mask")
    users = list(op.users)
    if not all(_is(u, operator.getitem) for u in users):
        raise Reject("the fused SDPA op's result tuple is used as a whole")
    used = sorted({u.args[1] for u in users})
    if used != [0] or len(users) != 1:
        raise Reject(f"fused SDPA outputs {used} are used, not only the attention output [0]: the logsumexp "
                     "[1] is saved for a backward (a training graph); the op has no backward")
    if not isinstance(fill, (int, float)) or isinstance(fill, bool) or fill != fill:
        raise Reject(f"the SDPA mask is where(keep, 0, {fill!r}), not a constant fill")
    fill = float(fill)
    if fill == NEG_INF:
        if kind == "sdpa_cudnn":
            raise Reject("cuDNN attention with a -inf mask: its result for a query with no kept key depends on "
                         "the cuDNN version (NaN or 0), so no empty_row reproduces it")
    elif not fill <= -MIN_FINITE_FILL:
        raise Reject(f"the SDPA mask fill {fill} is neither -inf nor <= -{MIN_FINITE_FILL:g}: masked keys "
                     "would keep a weight")
    else:
        m.note = (f"fused SDPA ({kind}) with a finite mask fill: a query with no kept key gives 0 (SDPA's "
                  "convention), eager's kernel a softmax over the row's T masked logits")
    q, k, v = a["query"], a["key"], a["value"]
    qv, kv, vv, bv = _val(q), _val(k), _val(v), _val(bias)
    if any(x is None or x.dim() != 4 for x in (qv, kv, vv)):
        raise Reject("q / k / v of the fused SDPA op are not 4-d [B, H, S|T, D]")
    if qv.dtype not in _FLOATS or kv.dtype != qv.dtype or vv.dtype != qv.dtype or bv.dtype != qv.dtype:
        raise Reject(f"q / k / v / bias dtypes {qv.dtype}, {kv.dtype}, {vv.dtype}, {bv.dtype} are not one "
                     "float dtype")
    if bv.dim() != 4 or not statically_known_true(bv.shape[0] == qv.shape[0]) or \
            not statically_known_true(bv.shape[1] == 1):
        raise Reject(f"the SDPA mask {tuple(bv.shape)} is not [B, 1, S, T] for q {tuple(qv.shape)}")
    scale = a["scale"]
    if scale is None:  # SDPA's default, sdp::calculate_scale
        d = qv.shape[-1]
        if not isinstance(d, int):
            raise Reject("fused SDPA's default scale 1/sqrt(Dqk) of a dynamic head dim; the op takes a number")
        scale = 1.0 / math.sqrt(d)
    if not isinstance(scale, (int, float)):
        raise Reject("the fused SDPA scale is a symbolic value; the op takes a number")
    out = users[0]
    nodes.update((op, out))
    m.q, m.k, m.v, m.out, m.scale, m.form, m.sdpa = q, k, v, out, float(scale), kind, op
    return m


def _match_softmax_and_pv(m: DenseMatch, logits):
    nodes = m.nodes
    lv = _val(logits)
    if lv is None or lv.dim() != 4:
        raise Reject("the masked scores are not [B, H, S, T]")
    xs = logits
    users = list(logits.users)
    if len(users) == 1 and _is(users[0], prims.convert_element_type.default):
        xs = users[0]
        nodes.add(xs)
        users = list(xs.users)
    amax = [u for u in users if _is(u, aten.amax.default)]
    if len(amax) != 1 or list(amax[0].args[1]) not in ([-1], [3]):
        raise Reject("the masked scores do not feed a softmax over the last dim")
    amax = amax[0]
    nodes.add(amax)
    sub = _only_user(amax, nodes)
    exp = _only_user(sub, nodes) if _is(sub, aten.sub.Tensor) and sub.args == (xs, amax) else None
    if not _is(exp, aten.exp.default):
        raise Reject("not a softmax: x - amax does not feed exp")
    ssum = [u for u in exp.users if _is(u, aten.sum.dim_IntList)]
    div = [u for u in exp.users if _is(u, aten.div.Tensor)]
    if len(exp.users) != 2 or len(ssum) != 1 or len(div) != 1 or div[0].args != (exp, ssum[0]):
        raise Reject("not a softmax: exp does not feed exactly sum and div")
    nodes.update((ssum[0], div[0]))
    if list(ssum[0].users) != div:
        raise Reject("the softmax sum is used elsewhere")
    p = div[0]
    others = [u for u in users if u not in (amax, sub)]
    if others:  # SDPA's safe softmax: where(~any(x != -inf), 0, p)
        if len(others) != 1 or not _is(others[0], aten.eq.Scalar) or others[0].args[1] != NEG_INF:
            raise Reject("the masked scores have another consumer besides the softmax")
        eq = others[0]
        n1 = _only_user(eq, nodes)
        n2 = _only_user(n1, nodes) if _is(n1, aten.logical_not.default) else None
        n3 = _only_user(n2, nodes) if _is(n2, aten.any.dim) else None
        w = _only_user(n3, nodes) if _is(n3, aten.logical_not.default) else None
        if not (_is(w, aten.where.self) and w.args[0] is n3 and w.args[2] is p and _full_value_any(w.args[1]) == 0):
            raise Reject("the masked scores have another consumer besides the softmax")
        nodes.add(eq)
        if list(p.users) != [w]:
            raise Reject("the attention weights are used elsewhere")
        p = w
        m.empty_row = _op_module.EMPTY_ZERO
    nxt = _only_user(p, nodes)
    if _is(nxt, prims.convert_element_type.default):
        p = nxt
        nxt = _only_user(p, nodes)
    # P @ V: expand -> reshape -> bmm -> reshape
    chain = nxt
    if _is(chain, aten.expand.default):
        chain = _only_user(chain, nodes)
    if _is(chain, aten.reshape.default):
        chain = _only_user(chain, nodes)
    if not _is(chain, aten.bmm.default):
        raise Reject("the attention weights do not feed a matmul with v")
    bmm = chain
    out = _only_user(bmm, nodes)
    if not _is(out, aten.reshape.default) or _val(out).dim() != 4:
        raise Reject("P @ V is not a 4-d matmul")
    v = _strip_view_chain(bmm.args[1], nodes)
    if _val(v) is None or _val(v).dim() != 4:
        raise Reject("v is not [B, H, T, Dv]")
    m.out, m.v = out, v


def _full_value_any(node):
    if _is(node, aten.full.default):
        return node.args[1]
    return None


def _match_scores(m: DenseMatch):
    nodes = m.nodes
    s, scale = _scalar_factor(m.scores)
    if s is not m.scores:
        nodes.add(m.scores)
        if len(m.scores.users) != 1:
            raise Reject("the scaled scores are used elsewhere")
    if _is(s, aten.reshape.default):
        nodes.add(s)
        if len(s.users) != 1:
            raise Reject("the scores are used elsewhere")
        s = s.args[0]
    if _is(s, aten.mul.Tensor, aten.div.Tensor) and isinstance(_val(s.args[1]), (torch.SymFloat, torch.SymInt)):
        raise Reject("the softmax scale is a symbolic value (e.g. head_dim ** -0.5 of a dynamic dim); the op "
                     "takes a number")
    if not _is(s, aten.bmm.default) or len(s.users) != 1:
        raise Reject("the masked scores are not a q @ k^T matmul")
    nodes.add(s)
    q, kt = (_strip_view_chain(a, nodes) for a in s.args[:2])
    q, f1 = _scalar_factor(q)
    kt, f2 = _scalar_factor(kt)
    if _is(kt, aten.permute.default) and list(kt.args[1]) == [0, 1, 3, 2]:
        k, f3 = _scalar_factor(kt.args[0])
    else:
        raise Reject("the key operand is not k.transpose(-1, -2)")
    qv, kv, vv = _val(q), _val(k), _val(m.v)
    if qv is None or kv is None or qv.dim() != 4 or kv.dim() != 4:
        raise Reject("q / k are not 4-d [B, H, S|T, D]")
    if qv.dtype not in _FLOATS or kv.dtype != qv.dtype or vv.dtype != qv.dtype:
        raise Reject(f"q / k / v dtypes {qv.dtype}, {kv.dtype}, {vv.dtype} are not one float dtype")
    m.q, m.k, m.scale = q, k, scale * f1 * f2 * f3


def _is_leading_slice(v, k) -> bool:
    """``v = k[..., :dv]`` (MLA), also as ``x[..., :dv][:, None]`` beside ``k = x[:, None]``."""
    def lead(node, kk):
        rank = _val(node).dim() if _val(node) is not None else None
        return (_is(node, aten.slice.Tensor) and node.args[0] is kk and rank is not None and
                node.args[1] in (-1, rank - 1) and (len(node.args) < 3 or node.args[2] == 0) and
                (len(node.args) < 5 or node.args[4] == 1))

    if lead(v, k):
        return True
    return (_is(v, aten.unsqueeze.default) and _is(k, aten.unsqueeze.default) and v.args[1] == k.args[1] and
            lead(v.args[0], k.args[0]))


def _build_dense(graph, m: DenseMatch, stats) -> str:
    """Insert the op for a dense match and reroute the attention output; returns the variant name."""
    k1, v1 = _peel_heads(m.k), _peel_heads(m.v)
    kv_, vv_ = _val(k1), _val(v1)
    h = _val(m.q).shape[1]
    shared = statically_known_true(kv_.shape[1] == 1)
    if not shared and not statically_known_true(kv_.shape[1] == h):
        raise Reject(f"k has {kv_.shape[1]} heads after peeling its expansion; the op takes 1 or H")
    if statically_known_true(kv_.shape[1] == 1) != statically_known_true(vv_.shape[1] == 1):
        k1, v1 = m.k, m.v  # one of them is per-head: keep both per-head
        kv_, vv_ = _val(k1), _val(v1)
        shared = False
    mla = _is_leading_slice(v1, k1)
    dv = vv_.shape[-1]
    causal = m.causal
    cval = _val(causal) if causal is not None else None
    if cval is not None:
        if cval.dim() == 4:
            if not statically_known_true(cval.shape[1] == 1):
                raise Reject("the causal mask has a head dim: the op takes one mask per (batch, query)")
        elif cval.dim() > 4:
            raise Reject("the causal mask has more than 4 dims")
    unique = _index_provenance_unique(m.idx)
    # Per-head k/v: dedup always (a no-op for a topk's distinct indices, exact for the dense mask either way); on
    # CUDA it selects the op's masked flash kernel, which reads whole key tiles once for a block of queries.
    dedup = not unique or not shared
    out_val = _val(m.out)
    with graph.inserting_before(m.out), _val(m.q).fake_mode:
        q4 = _new_node(graph, aten.permute.default, (m.q, [0, 2, 1, 3]))
        k4 = _new_node(graph, aten.permute.default, (k1, [0, 2, 1, 3]))
        v4 = None if mla else _new_node(graph, aten.permute.default, (v1, [0, 2, 1, 3]))
        keep = None
        if causal is not None:
            keep = causal
            if cval.dim() == 4:
                keep = _new_node(graph, aten.select.int, (causal, 1, 0))
        if not isinstance(dv, int):  # a dynamic head dim: its size node
            dv = graph.call_function(aten.sym_size.int, (v1, 3))
            dv.meta["val"] = vv_.shape[-1]
        args = (q4, k4, v4, m.idx, None, keep, None, m.scale, dv, m.empty_row, dedup, out_val.dtype)
        fused = _new_node(graph, OP, args)
        out = _new_node(graph, aten.permute.default, (fused, [0, 2, 1, 3]))
    m.out.replace_all_uses_with(out)
    graph.erase_node(m.out)
    if not unique:
        stats.notes["topk_indices not from a topk: repeated indices counted once (dedup), as the dense mask"] += 1
    elif dedup:
        stats.notes["per-head k/v: dedup on (the topk's indices are distinct: exact), the masked flash path on "
                    "CUDA"] += 1
    layout = "mla" if mla else ("shared_kv" if shared else "per_head_kv")
    empty = m.form or {0: "nan", 1: "safe_softmax", 2: "finfo_min"}[m.empty_row]
    return f"dense_mask:{layout}:{empty}"


def mask_to_row_ends(graph: torch.fx.Graph, stats) -> int:
    """Replace a fused op's ``keep_mask`` by ``row_ends`` when it is an ``arange`` comparison (a causal mask)."""
    done = 0
    for node in list(graph.nodes):
        if node.target is not OP or node.args[5] is None or node.args[4] is not None:
            continue
        found = _mask_as_bounds(node.args[5])
        if found is None:
            continue
        peels, bounds, rank = found
        if set(bounds) != {"ends"}:
            continue
        row, terms = bounds["ends"]
        args = list(node.args)
        with graph.inserting_before(node), row.meta["val"].fake_mode:
            ends = _bound_node(graph, row, peels, terms, rank)
            ev = ends.meta["val"]
            if ev.dim() > 2:
                continue
            args[4], args[5] = ends, None
        node.args = tuple(args)
        done += 1
        stats.notes["keep mask -> row_ends: the causal mask is an arange comparison, no mask read"] += 1
    if done:
        graph.eliminate_dead_code()
    return done


class SparseAttentionRule(Rule):
    name = "sparse_attention"
    op = "dsa_inductor::sparse_attention"
    anchors = (aten.scatter.value, aten.index.Tensor)
    exact_retrace = True  # the gather variants under dynamic B, S, T, K (common.specific_mismatch)

    def variants(self):
        yield from gather_variants()

    def apply(self, graph: torch.fx.Graph) -> int:
        st = stats_for(self.name, self.op)
        dense = 0
        for sc in [n for n in graph.nodes if _is(n, aten.scatter.value)]:
            try:
                m = _match_dense(sc)
                variant = _build_dense(graph, m, st)
                if m.sdpa is not None:  # its output [0] is rerouted; a seeded op is not dead code to DCE
                    graph.erase_node(m.sdpa)
                if m.note:
                    st.notes[m.note] += 1
            except Reject as r:
                st.candidates += 1
                st.rejections[str(r)] += 1
                log.info("rule %s left %s at %s alone: %s", self.name, sc.name, source_location(sc), r)
                continue
            st.candidates += 1
            st.matches[variant] += 1
            st.locations[source_location(sc)] += 1
            dense += 1
        if dense:
            graph.eliminate_dead_code()
        matched = dense
        if any(_is(n, aten.index.Tensor) for n in graph.nodes):
            matched += self._apply_gather(graph)
        if matched:
            mask_to_row_ends(graph, st)
        return matched

    def _apply_gather(self, graph) -> int:
        """The traced gather variants (the base class's pass over ``aten.index`` candidates)."""
        saved = self.anchors
        self.anchors = (aten.index.Tensor,)
        try:
            return super().apply(graph)
        finally:
            self.anchors = saved

    def diagnose(self, node: torch.fx.Node) -> str:
        users = list(node.users)
        if not users:
            return "the gathered keys are unused"
        return ("the gathered keys do not feed a q . k softmax attention that matches a gather variant "
                "(einsum/matmul, masked_fill(idx == -1 or idx < 0, -inf), softmax over the last dim)")
