"""Rule ``index_score``: per-head ``q . k``, relu, scale, weighted sum over heads -> ``dsa_inductor::index_score``.

The idiom is the DSA lightning indexer's score (transformers' ``DeepseekV32Indexer.forward``; DeepSeek's
reference ``Indexer`` computes it with ``fp8_index``)::

    scores = torch.matmul(q.float(), k.transpose(-1, -2).float().unsqueeze(1)) * self.softmax_scale
    scores = F.relu(scores)
    index_scores = torch.matmul(weights.unsqueeze(-2), scores).squeeze(-2)

Eager materializes ``[B, S, H, T]`` fp32 scores (and, for transformers' broadcast matmul, a
``[B, S, D, T]`` fp32 copy of k).  Search variants are the product of

* a score form: ``matmul`` (transformers' spelling above) or ``einsum('bshd,btd->bsht', q.float(), k.float())``,
  each traced on bf16 inputs (the ``.float()`` upcasts are nodes; they also match fp16 and FP8), on fp32
  inputs (the upcasts vanish), and on bf16 q with fp32 k (keys dequantized from an FP8 cache: only q's
  upcast is a node);
* where the scale is: ``pre`` (``relu(x * scale)``), ``post`` (``relu(x) * scale``), ``none``;
* the head reduction: ``matmul`` (``weights.unsqueeze(-2) @ scores`` then ``squeeze``), ``mulsum``
  (``(scores * weights[..., None]).sum(dim=heads)``), ``einsum('bsht,bsh->bst')``;
* batch 1 or not (Dynamo specializes a batch of 1, and ``matmul`` / ``einsum`` decompose it differently).

``scale`` is captured with ``scalar_workaround``; the shared check requires it to be a number (a tensor
scale, per head or per position, is left alone).  The re-trace on the matched shapes checks every int (the
reduced dim, the permutations), so a sum over another dim never matches.  Per-head scores in bf16/fp16
(an einsum on un-upcast inputs) are left alone: the op computes them in fp32.

Follow-ups, after the matches: ``read_fp8_cache`` (keys that ``dsa_inductor::gather_dequant`` dequantized
from an FP8 cache are read by the score kernel from the cache itself, ``k_slots``), then the mask_topk
module's ``bound_index_scores`` (a range top-k's bounds passed into the score).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Optional

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .. import testing
from ..canonicalize import drop_bmm_operand_clones, restore_bmm_operand_clones, trace_joint
from ..lowerings import index_score as _op_module  # noqa: F401  (defines the op)
from ..report import stats_for
from .common import Rule, Variant, sym_size, tensor_meta
from .gather_dequant import is_zero_full, slot_of_page_pos, takes_scale_bytes

aten = torch.ops.aten
SCALE_MAGIC = 0.3711  # stands for the scale while tracing


def _matmul_scores(q, k):
    return torch.matmul(q.float(), k.transpose(1, 2).float().unsqueeze(1))


def _einsum_scores(q, k):
    return torch.einsum("bshd,btd->bsht", q.float(), k.float())


SCORE_FORMS = {"matmul": _matmul_scores, "einsum": _einsum_scores}


def _matmul_reduce(y, w):
    return torch.matmul(w.unsqueeze(2), y).squeeze(2)


def _mulsum_reduce(y, w):
    return (y * w.unsqueeze(3)).sum(dim=2)


def _einsum_reduce(y, w):
    return torch.einsum("bsht,bsh->bst", y, w)


REDUCTIONS = {"matmul": _matmul_reduce, "mulsum": _mulsum_reduce, "einsum": _einsum_reduce}
SCALES = ("pre", "post", "none")


@dataclasses.dataclass(frozen=True)
class Form:
    score: str
    upcast: str  # "both": traced on bf16 q and k (the `.float()` upcasts are nodes); "q": bf16 q, fp32 k
    # (dequantized keys); "none": fp32 inputs (the upcasts vanish)
    scale: str
    reduce: str
    bs1: bool

    @property
    def name(self) -> str:
        tag = {"both": "_upcast", "q": "_qupcast", "none": ""}[self.upcast]
        return (f"{self.score}{tag}:scale_{self.scale}:{self.reduce}"
                f"{':bs1' if self.bs1 else ''}")


def _activated(form: Form, x, scale):
    if form.scale == "pre":
        return torch.relu(x * scale)
    y = torch.relu(x)
    return y * scale if form.scale == "post" else y


def _trace(fn, args, **kwargs):
    """``trace_joint`` without the bmm operands' contiguity clones, as ``IndexScoreRule.apply`` drops them
    from the graph (the exact re-trace on a transposed q has them)."""
    gm = trace_joint(fn, args, **kwargs)
    if drop_bmm_operand_clones(gm.graph, [n for n in gm.graph.nodes if n.target is aten.bmm.default]):
        gm.recompile()
    return gm


def _make_variant(form: Form) -> Variant:
    has_scale = form.scale != "none"
    argnames = ("q", "k", "weights") + (("scale",) if has_scale else ())
    score, reduce = SCORE_FORMS[form.score], REDUCTIONS[form.reduce]

    def search(*args):
        q, k, w = args[:3]
        return reduce(_activated(form, score(q, k), args[3] if has_scale else 1.0), w)

    def replace(*args):
        q, k, w = args[:3]
        scale = args[3] if has_scale else 1.0
        return torch.ops.dsa_inductor.index_score(q, k, w, scale, form.scale == "post", None)

    def example_inputs():
        b, s, h, d, t = (1 if form.bs1 else 2), 5, 3, 16, 7
        qdt = torch.float32 if form.upcast == "none" else torch.bfloat16
        kdt = torch.bfloat16 if form.upcast == "both" else torch.float32
        ex = [torch.empty(b, s, h, d, dtype=qdt), torch.empty(b, t, d, dtype=kdt), torch.empty(b, s, h)]
        return ex + ([SCALE_MAGIC] if has_scale else [])

    workaround = {"scale": SCALE_MAGIC} if has_scale else {}

    def compare(args, expected, actual):
        """Verify mode: the fp32 sum bound (``testing.index_score_tolerance``) against the eager subgraph."""
        q, k, w = args[:3]
        scale = args[3] if has_scale else 1.0
        return testing.score_mismatch(actual[0], expected[0], testing.index_score_tolerance(q, k, w, scale))

    return Variant(form.name, argnames, search, replace, example_inputs, workaround, compare=compare,
                   check=lambda m: _check(form, m), trace=_trace)


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _val(n):
    return n.meta.get("val") if isinstance(n, torch.fx.Node) else None


def _scale_node_arg(relu: torch.fx.Node, where: str):
    """The other operand of the scale multiply next to ``relu`` (before or after it), or None."""
    if where == "pre":
        mul = relu.args[0]
        return mul.args[1] if isinstance(mul, torch.fx.Node) and mul.target is aten.mul.Tensor else None
    for user in relu.users:
        if user.target is aten.mul.Tensor and user.args[0] is relu:
            return user.args[1]
    return None


def _check(form: Form, match) -> Optional[str]:
    """Shared checks on the matched (re-traced) values; returns a rejection reason or None."""
    q, k, w = (tensor_meta(match, n) for n in ("q", "k", "weights"))
    if q is None or k is None or w is None:
        return "q, k or weights is not a tensor"
    if q.dim() != 4 or k.dim() != 3:
        return f"q has rank {q.dim()} and k rank {k.dim()}, expected [B, S, H, D] and [B, T, D]"
    if q.dtype not in _FLOATS + (torch.float8_e4m3fn,) or k.dtype not in (q.dtype, torch.float32):
        return (f"q / k dtypes {q.dtype} / {k.dtype}: the op takes one of float32/float16/bfloat16/float8_e4m3fn "
                "for both, or float32 k")
    if w.dim() != 3 or w.dtype not in _FLOATS or not all(
            statically_known_true(a == b) for a, b in zip(w.shape, q.shape[:3])):
        return (f"weights {tuple(w.shape)} {w.dtype} are not one float per [B, S, H] = {tuple(q.shape[:3])} "
                "(broadcast weights are not taken)")
    if not (statically_known_true(k.shape[0] == q.shape[0]) or statically_known_true(k.shape[0] == 1)):
        return f"k has batch {k.shape[0]}, q {q.shape[0]}"
    if form.upcast == "q":
        k_node = match.kwargs.get("k")
        if isinstance(k_node, torch.fx.Node) and k_node.target is prims.convert_element_type.default:
            return "k is upcast too: the bf16 q and k form (which keeps bf16 dots)"
    relus = [n for n in match.nodes if n.target is aten.relu.default]
    if len(relus) != 1:
        return "no single relu in the match"
    relu = relus[0]
    if _val(relu) is None or _val(relu).dtype != torch.float32:
        return f"per-head scores are {getattr(_val(relu), 'dtype', None)}: the op computes them in fp32"
    if form.scale != "none":
        arg = _scale_node_arg(relu, form.scale)
        if not isinstance(arg, (int, float)):
            return "the scale is a tensor (per head or per position), the op takes one number per call"
        if not math.isfinite(arg):  # relu(x * inf) is NaN at x == 0; the op takes finite scales only
            return f"the scale {arg} is not finite"
    out = _val(match.output_nodes()[0])
    if out is None or out.dtype != torch.float32 or out.dim() != 3:
        return f"the head reduction gives {getattr(out, 'dtype', None)} {tuple(getattr(out, 'shape', ()))}, " \
               "expected float32 [B, S, T]"
    return None


def _bmm_of(node, depth=0) -> Optional[torch.fx.Node]:
    """The ``bmm`` that ``node`` is a reshape / permute / scaling / cast of, or None."""
    if not isinstance(node, torch.fx.Node) or depth > 6:
        return None
    if node.target is aten.bmm.default:
        return node
    if node.target in (aten.reshape.default, aten.permute.default, aten.mul.Tensor, aten.div.Tensor,
                       prims.convert_element_type.default):
        return _bmm_of(node.args[0], depth + 1)
    return None


prims = torch.ops.prims


def _normalize_dims(graph: torch.fx.Graph) -> None:
    """``sum(x, [-2])`` / ``squeeze(x, -2)`` -> non-negative dims (same values), as the variants spell them."""
    for node in graph.nodes:
        val = _val(node.args[0]) if node.op == "call_function" and node.args else None
        if not isinstance(val, torch.Tensor):
            continue
        if node.target is aten.sum.dim_IntList and isinstance(node.args[1], (list, tuple)):
            dims = [d + val.dim() if isinstance(d, int) and d < 0 else d for d in node.args[1]]
            node.args = (node.args[0], dims, *node.args[2:])
        elif node.target is aten.squeeze.dim and isinstance(node.args[1], int) and node.args[1] < 0:
            node.args = (node.args[0], node.args[1] + val.dim())


_VIEWS = (aten.reshape.default, aten.view.default, aten.unsqueeze.default)
_SCORE_DEFAULTS = (None, -1, False, None, None, None, 0, False, False)  # index_score's args after row_ends


def score_args(node: torch.fx.Node) -> Optional[list]:
    """An ``index_score`` node's 15 args with defaults filled in, or None if it has kwargs."""
    if node.kwargs or len(node.args) < 6:
        return None
    return list(node.args) + list(_SCORE_DEFAULTS[len(node.args) - 6:])


def set_score_args(node: torch.fx.Node, args) -> None:
    node.args = tuple(args)
    if "eager_input_vals" in node.meta:  # Inductor aligns these with the args (layout constraints)
        node.meta["eager_input_vals"] = (torch.fx.node.map_arg(node.args, lambda a: a.meta.get("val")), {})


def _static_numel(shape):
    n = 1
    for x in shape:
        n = n * x
    return n


def read_fp8_cache(graph: torch.fx.Graph, stats) -> int:
    """Fold an FP8 gather-dequant that feeds an index score into the score kernel (``k_slots``).

    ``index_score(q, reshape(gather_dequant(cache, scales, slots, fmt="e4m3", out_dtype=float32)), w, ...)``
    becomes ``index_score(q, cache, w, ..., k_slots=reshape(slots), k_cache_scale=scales, ...)``: the kernel
    gathers the FP8 rows and dequantizes them in registers, the same fp32 products eager writes, and the
    ``[T, D]`` fp32 copy is never made.  Taken only where the dequantized keys have no other user, with
    one fp32 scale per token (``G = 1``), slot, paged-slot or ``(x // B, x % B)`` addressing (see
    ``_addressing``), and viewed to ``[B, T, D]`` by reshapes alone.
    """
    done = 0
    gd_op = torch.ops.dsa_inductor.gather_dequant.default
    for node in list(graph.nodes):
        if node.target is not torch.ops.dsa_inductor.index_score.default:
            continue
        args = score_args(node)
        if args is None or args[10] is not None:
            continue
        chain, src = [], args[1]
        while isinstance(src, torch.fx.Node) and src.target in _VIEWS:
            chain.append(src)
            src = src.args[0]
        if not (isinstance(src, torch.fx.Node) and src.target is gd_op):
            continue
        why = _cache_fold_refusal(src, chain, node, args)
        if why is not None:
            stats.notes[f"gather_dequant -> index_score: not folded, {why}"] += 1
            continue
        address = _addressing(src)
        if isinstance(address, str):
            stats.notes[f"gather_dequant -> index_score: not folded, {address}"] += 1
            continue
        x, block_size, drop, zero_negative = address
        values, scales = src.args[:2]
        kval = _val(args[1])
        with graph.inserting_before(node), kval.fake_mode:
            slots = x
            if drop is not None:  # dropped tokens: slot -1, a zero key (every kept slot is >= 0)
                xv = _val(x)
                pad = graph.call_function(aten.full.default, ([], -1), {"dtype": xv.dtype, "device": xv.device})
                pad.meta["val"] = aten.full.default([], -1, dtype=xv.dtype, device=xv.device)
                slots = graph.call_function(aten.where.self, (drop, pad, x))
                slots.meta["val"] = aten.where.self(_val(drop), pad.meta["val"], xv)
            if tuple(_val(slots).shape) != tuple(kval.shape[:2]):
                # k's batch is 1 or q's (checked): sizes from q, not from the views about to be erased
                size = [1 if statically_known_true(kval.shape[0] == 1) else sym_size(graph, args[0], 0), -1]
                flat = slots
                slots = graph.call_function(aten.reshape.default, (flat, size))
                slots.meta["val"] = aten.reshape.default(_val(flat), [kval.shape[0], -1])
        args[1], args[10:15] = values, [slots, scales, block_size, bool(zero_negative), takes_scale_bytes(src)]
        set_score_args(node, args)
        for dead in chain + [src]:
            if not dead.users:
                graph.erase_node(dead)
        done += 1
        stats.notes["gather_dequant -> index_score: FP8 cache read by the score kernel (no dequantized copy)"] += 1
    return done


def _cache_fold_refusal(gd: torch.fx.Node, chain, score: torch.fx.Node, args) -> Optional[str]:
    values, scales, index0 = gd.args[:3]
    fmt, out_dtype = gd.args[7:9]
    nodes = [gd] + chain[::-1]
    if any(len(n.users) != 1 for n in nodes) or [a for a in score.args if a is args[1]] != [args[1]]:
        return "the dequantized keys have another user"
    if fmt != "e4m3" or out_dtype != torch.float32:
        return f"fmt {fmt!r} / out_dtype {out_dtype} (the score kernel reads e4m3 with a float32 result only)"
    v, sc, i0, k = _val(values), _val(scales), _val(index0), _val(args[1])
    if takes_scale_bytes(gd) and sc is not None:  # the fp32 view the op takes
        sc = sc.view(torch.float32)
    if sc is None or sc.dtype not in _FLOATS or sc.shape[-1] != 1 or sc.dim() != v.dim():
        return "not one float scale per cache row (block or UE8M0 scales)"
    q = _val(args[0])
    if q is None or q.dtype not in _FLOATS or k is None or k.dim() != 3 or i0 is None:
        return "q or k is not a float tensor of the op's shape"
    if not (statically_known_true(k.shape[-1] == v.shape[-1])
            and statically_known_true(_static_numel(k.shape[:-1]) == _static_numel(i0.shape))):
        return "the reshapes to [B, T, D] move the head dim"
    if not (statically_known_true(k.shape[0] == 1) or statically_known_true(k.shape[0] == q.shape[0])):
        return "k's batch is neither 1 nor q's"
    return None


def _conjuncts(node):
    if isinstance(node, torch.fx.Node) and node.target in (aten.bitwise_and.Tensor, aten.logical_and.default):
        return _conjuncts(node.args[0]) + _conjuncts(node.args[1])
    return [node]


def _nonnegative_when(keep, x) -> bool:
    """Whether ``keep`` implies ``x >= 0``: one of its conjuncts is ``x >= 0`` or ``~(x < 0)``."""
    for c in _conjuncts(keep):
        if not isinstance(c, torch.fx.Node):
            continue
        if c.target is aten.ge.Scalar and c.args[0] is x and c.args[1] == 0:
            return True
        if c.target in (aten.bitwise_not.default, aten.logical_not.default):
            inner = c.args[0]
            if isinstance(inner, torch.fx.Node) and inner.target is aten.lt.Scalar and inner.args[0] is x \
                    and inner.args[1] == 0:
                return True
    return False


def _addressing(gd: torch.fx.Node):
    """How a ``gather_dequant`` addresses its cache, as the score kernel's ``(slots, block_size, drop,
    zero_negative)`` (``drop``: a bool node whose tokens get slot -1), or a refusal reason.

    Slots (``index0`` alone, with ``block_size`` for a paged cache) pass as they are.  ``(page, pos)``
    indices are taken when they are ``x // B`` and ``x % B`` of one int tensor ``x`` with ``B`` at most the
    cache's (and the scale table's) page dim: the kernel reads ``cache[x // B, x % B]`` itself.  Each may be
    ``where(keep, ., 0)`` with ``drop = ~keep`` (the lifted per-token loop's form of its ``if slot < 0:
    continue``) when ``keep`` implies ``x >= 0``: then dropped tokens are slot -1, padding.
    """
    values, scales, index0, index1, block_size, drop, zero_negative = gd.args[:7]
    v, sc = _val(values), _val(scales)
    if index1 is None:
        if drop is not None:
            return "a drop mask on slot indices"
        if (v.dim() == 3) != (isinstance(block_size, int) and block_size > 0):
            return "whole pages gathered (no slot addressing)"
        return index0, block_size, None, zero_negative
    keeps = []

    def strip(idx):
        if isinstance(idx, torch.fx.Node) and idx.target is aten.where.self and is_zero_full(idx.args[2]):
            keeps.append(idx.args[0])
            return idx.args[1]
        return idx

    i0, i1 = strip(index0), strip(index1)
    if len(keeps) == 1 or (keeps and keeps[0] is not keeps[1]):
        return "(page, position) indices masked by different conditions"
    found = slot_of_page_pos(i0, i1)
    if found is None:
        return "(page, position) indices that are not x // B and x % B"
    x, page = found
    tokens = tuple(_val(index0).shape)
    if tuple(_val(x).shape) != tokens or (drop is not None and tuple(_val(drop).shape) != tokens):
        return "(page, position) indices broadcast beyond their slots"
    if v.dim() != 3 or not (statically_known_true(page <= v.shape[1]) and statically_known_true(page <= sc.shape[1])):
        return f"a page of {page} tokens beyond the cache's page views"
    if not keeps:
        return ("a drop mask on (page, position) indices" if drop is not None else
                (x, page, None, zero_negative))
    keep = keeps[0]
    if not (isinstance(drop, torch.fx.Node) and drop.target is aten.bitwise_not.default and drop.args[0] is keep):
        return "a drop mask other than the complement of the kept tokens"
    if not _nonnegative_when(keep, x):
        return "kept tokens whose slot is not provably >= 0"
    return x, page, drop, True


class IndexScoreRule(Rule):
    name = "index_score"
    op = "dsa_inductor::index_score"
    anchors = (aten.relu.default,)
    exact_retrace = True  # S, T, H, D all dynamic: see common.specific_mismatch

    def variants(self):
        for score, upcast, scale, reduce, bs1 in itertools.product(SCORE_FORMS, ("both", "q", "none"), SCALES,
                                                                   REDUCTIONS, (False, True)):
            yield _make_variant(Form(score, upcast, scale, reduce, bs1))

    def candidates(self, graph: torch.fx.Graph) -> list:
        """Relus of a batched matmul's output (4-d): the only relus this rule could rewrite."""
        return [n for n in graph.nodes if n.op == "call_function" and n.target is aten.relu.default
                and isinstance(_val(n), torch.Tensor) and _val(n).dim() == 4 and _bmm_of(n.args[0]) is not None]

    def apply(self, graph: torch.fx.Graph) -> int:
        relus = self.candidates(graph)
        if relus:
            _normalize_dims(graph)
        clones = drop_bmm_operand_clones(graph, {_bmm_of(r.args[0]) for r in relus})
        try:
            matched = super().apply(graph)
        finally:
            restore_bmm_operand_clones(graph, clones)
        if matched:
            from .mask_topk import bound_index_scores  # the chain: score -> range top-k

            read_fp8_cache(graph, stats_for(self.name, self.op))
            bound_index_scores(graph, stats_for(self.name, self.op))
        return matched

    def diagnose(self, node: torch.fx.Node) -> str:
        val = _val(node)
        if val.dtype != torch.float32:
            return f"per-head scores are {val.dtype}: the op computes them in fp32"
        pre = node.args[0]
        if pre.target is aten.mul.Tensor and isinstance(pre.args[1], torch.fx.Node):
            return "the scale is a tensor (per head or per position), the op takes one number per call"
        for user in node.users:
            if user.target is aten.mul.Tensor and isinstance(user.args[1], torch.fx.Node):
                v = _val(user.args[1])
                if v is not None and v.dim() >= 1 and v.shape[-1] != 1 and user.args[1].target is not \
                        aten.unsqueeze.default:
                    return "the scale is a tensor (per head or per position), the op takes one number per call"
        if len(node.users) != 1:
            return "the per-head scores have another consumer besides the head reduction"
        return ("the scores or the head reduction match no variant (e.g. a reduction over another dim than "
                "the heads, or weights that broadcast)")
