"""Rule ``windowed_softmax``: softmax of scores masked to a per-row window -> ``dsa_inductor::windowed_softmax``.

The idiom is attention's masked softmax when the mask is a window of positions per row: causal
(``kv <= q``), a sliding window (``(kv > q - w) & (kv <= q)``, DeepSeek-V4's last 128 keys), or
explicit ``[ks, ke)`` offsets (DSA prefill, computed from ``cu_seqlens``)::

    pos = torch.arange(T); keep = (pos >= ks[:, None]) & (pos < ke[:, None])
    probs = scores.masked_fill(~keep, float("-inf")).softmax(dim=-1)
    probs = torch.softmax(torch.where(keep, scores, float("-inf")), dim=-1, dtype=torch.float32)

Post-grad graphs hold softmax decomposed (``amax``, ``sub``, ``exp``, ``sum``, ``div``, with
``convert_element_type`` around it for half inputs); the anchor is ``aten.amax``.  Search variants are
the product of

* a mask form: ``range`` (both bounds tensors), ``causal`` (``row_ends`` only), each as ``masked_fill``
  and ``torch.where``; and ``keep_mask`` / ``keep_mask_where`` (a bool mask, accepted only when it is an
  ``arange`` comparison that the follow-up turns into bounds; stock Inductor already fuses a masked
  softmax over a materialized mask into one kernel); ``drop_mask`` (``masked_fill(kv > q, -inf)``, a
  sliding window as ``(kv > q) | (kv <= q - w)``, converted by De Morgan);
* the dtype: the softmax in the scores' dtype (fp32; bf16/fp16 computed in fp32 and rounded back),
  ``softmax(masked.float())`` (``softmax(masked, dtype=torch.float32)`` is the same graph, so the same
  variant), ``masked_fill(x.float(), ...)``.

The fill must be ``-inf`` (checked exactly by the re-trace): with a finite fill an empty row is uniform,
not NaN, and masked positions are not exactly 0.  A mask comparison that the bound conversion does not
take (an offset ``arange``, a comparison of two per-row tensors) is left alone.  ``x + additive_mask``
is not matched: eager's ``+inf + -inf`` outside the window is NaN, which a kernel that never reads
outside the window cannot reproduce.

When the probabilities only feed ``@ v`` and the scores are a scaled ``q @ k^T``, the next rule,
``windowed_attention`` (``patterns/windowed_attention.py``), folds the op inserted here into
``dsa_inductor::windowed_attention``, which writes neither the dense scores nor the probabilities.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Optional

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .. import testing
from ..lowerings import windowed_softmax as _op_module  # noqa: F401  (defines the op)
from ..report import stats_for
from .common import Rule, Variant, tensor_meta
from .mask_topk import N_MAGIC, _causal_keep, _mask_as_bounds, _range_keep, replace_mask_by_bounds

aten = torch.ops.aten
NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class MaskForm:
    name: str
    tensors: tuple[str, ...]  # tensor inputs after `scores`
    keep: Callable  # (scores, *tensors, n) -> bool keep
    where: bool  # torch.where(keep, x, -inf) rather than x.masked_fill(~keep, -inf)
    has_n: bool = True
    drop: bool = False  # x.masked_fill(drop, -inf): the mask marks dropped positions


MASK_FORMS = (
    MaskForm("range", ("row_starts", "row_ends"), lambda x, s, e, n: _range_keep(x, s, e, n), False),
    MaskForm("range_where", ("row_starts", "row_ends"), lambda x, s, e, n: _range_keep(x, s, e, n), True),
    MaskForm("causal", ("row_ends",), lambda x, e, n: _causal_keep(x, e, n), False),
    MaskForm("causal_where", ("row_ends",), lambda x, e, n: _causal_keep(x, e, n), True),
    MaskForm("keep_mask", ("mask",), lambda x, m: m, False, has_n=False),
    MaskForm("keep_mask_where", ("mask",), lambda x, m: m, True, has_n=False),
    MaskForm("drop_mask", ("mask",), lambda x, m: m, False, has_n=False, drop=True),
)


@dataclasses.dataclass(frozen=True)
class DtypeForm:
    name: str
    example: torch.dtype  # dtype of the example scores the search is traced with
    upcast_first: bool  # x.float() before the mask
    softmax: Callable  # masked -> probabilities
    out_dtype: Optional[torch.dtype]  # None: the scores' dtype


DTYPE_FORMS = (  # registration order is match order: the upcast-first form before the fp32 form that also
    # matches it (taking the upcast as the scores, one more pass over them)
    DtypeForm("float_first", torch.bfloat16, True, lambda m: m.softmax(-1), torch.float32),
    DtypeForm("half", torch.bfloat16, False, lambda m: m.softmax(-1), None),  # fp32 compute, rounded back
    DtypeForm("float", torch.bfloat16, False, lambda m: torch.softmax(m.float(), dim=-1), torch.float32),
    DtypeForm("fp32", torch.float32, False, lambda m: m.softmax(-1), None),
)


def _make_variant(form: MaskForm, dt: DtypeForm) -> Variant:
    scalars = ("n",) if form.has_n else ()
    argnames = ("scores", *form.tensors, *scalars)
    n_t = 1 + len(form.tensors)

    def search(*args):
        x, tensors = args[0], args[1:n_t]
        if dt.upcast_first:
            x = x.float()
        keep = form.keep(x, *tensors, *args[n_t:])
        if form.drop:
            masked = x.masked_fill(keep, NEG_INF)  # `keep` is the drop mask here
        else:
            masked = torch.where(keep, x, NEG_INF) if form.where else x.masked_fill(~keep, NEG_INF)
        return dt.softmax(masked)

    def replace(*args):
        x, tensors = args[0], args[1:n_t]
        kw = dict(zip(form.tensors, tensors))
        if form.drop:
            kw["mask"] = ~kw["mask"]  # the op's mask keeps; mask_to_window turns ~(arange comparison) into bounds
        return torch.ops.dsa_inductor.windowed_softmax(
            x, kw.get("row_starts"), kw.get("row_ends"), kw.get("mask"), dt.out_dtype or x.dtype)

    def example_inputs():
        r, n = 4, N_MAGIC
        ex = {"scores": torch.empty(r, n, dtype=dt.example), "row_starts": torch.empty(r, dtype=torch.int64),
              "row_ends": torch.empty(r, dtype=torch.int64), "mask": torch.empty(r, n, dtype=torch.bool)}
        return [ex["scores"], *(ex[t] for t in form.tensors), *([N_MAGIC] if form.has_n else [])]

    workaround = {"n": N_MAGIC} if form.has_n else {}
    return Variant(f"{form.name}:{dt.name}", argnames, search, replace, example_inputs, workaround,
                   check=_check_drop if form.drop else _check,
                   compare=lambda args, expected, actual: testing.softmax_mismatch(expected[0], actual[0]))


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check(match, drop=False) -> Optional[str]:
    """Shared checks on the matched (re-traced) values; returns a rejection reason or None."""
    scores = tensor_meta(match, "scores")
    if scores is None or scores.dtype not in _FLOATS:
        return f"scores dtype {getattr(scores, 'dtype', None)} is not float32/float16/bfloat16"
    for node in match.nodes:  # the arange length (read from the node: torch 2.11 drops scalar kwargs here)
        if node.target is torch.ops.prims.iota.default:
            n = node.args[0]
            n = n.meta.get("val") if isinstance(n, torch.fx.Node) else n
            if not statically_known_true(n == scores.shape[-1]):
                return f"the arange length {n} is not the last dim of the scores ({scores.shape[-1]})"
    for name in ("row_starts", "row_ends"):
        t = tensor_meta(match, name)
        if t is not None and t.dtype not in (torch.int32, torch.int64):
            return f"{name} dtype {t.dtype} is not int32/int64"
    mask = match.kwargs.get("mask")
    if isinstance(mask, torch.fx.Node) and _mask_as_bounds(mask, negate=drop, row_len=scores.shape[-1]) is None:
        return (f"the {'drop ' if drop else ''}mask is not an arange comparison with per-row bounds that "
                "converts to a window "
                "(stock Inductor already fuses a softmax over a materialized mask)")
    return None


def _check_drop(match) -> Optional[str]:
    return _check(match, drop=True)


def _keep_as_bounds(mask, row_len):
    """Bounds of the op's keep mask: an arange comparison, or ``~drop`` of one (the drop_mask form)."""
    if mask.target is aten.bitwise_not.default:
        return _mask_as_bounds(mask.args[0], negate=True, row_len=row_len)
    return _mask_as_bounds(mask, row_len=row_len)


def mask_to_window(graph: torch.fx.Graph, stats) -> int:
    """Replace a fused softmax's bool mask by ``row_starts``/``row_ends`` (the check made sure it converts)."""
    done = 0
    for node in list(graph.nodes):
        if node.target is not torch.ops.dsa_inductor.windowed_softmax.default:
            continue
        scores, starts, ends, mask = node.args[:4]
        if mask is None or starts is not None or ends is not None:
            continue
        found = _keep_as_bounds(mask, scores.meta["val"].shape[-1])
        if found is None:
            continue
        replace_mask_by_bounds(graph, node, found, starts_at=1, mask_at=3, stats=stats)
        done += 1
    if done:
        graph.eliminate_dead_code()
    return done


def _softmax_input(amax: torch.fx.Node):
    """The tensor a decomposed softmax normalizes (before any upcast), or None."""
    x = amax.args[0]
    if isinstance(x, torch.fx.Node) and x.target is torch.ops.prims.convert_element_type.default:
        x = x.args[0]
    return x if isinstance(x, torch.fx.Node) else None


class WindowedSoftmaxRule(Rule):
    name = "windowed_softmax"
    op = "dsa_inductor::windowed_softmax"
    anchors = (aten.amax.default,)

    def variants(self):
        for form, dt in itertools.product(MASK_FORMS, DTYPE_FORMS):
            yield _make_variant(form, dt)

    def apply(self, graph: torch.fx.Graph) -> int:
        matched = super().apply(graph)
        if matched:
            mask_to_window(graph, stats_for(self.name, self.op))
        return matched

    def diagnose(self, node: torch.fx.Node) -> str:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        xs = node.args[0]
        val = xs.meta.get("val") if isinstance(xs, torch.fx.Node) else None
        rank = val.dim() if isinstance(val, torch.Tensor) else None
        if list(dims or []) != [-1]:
            if rank is not None and list(dims or []) == [rank - 1]:
                return f"softmax over dim {rank - 1}, spelled as a positive index"
            return f"amax/softmax over dims {dims}, not the last dim"
        subs = [u for u in node.users if u.target is aten.sub.Tensor and u.args == (xs, node)]
        if len(subs) != 1 or len(node.users) != 1:
            return "amax is not the max of a softmax"
        if any(u.target is not aten.exp.default for u in subs[0].users):
            return "not a softmax: x - amax feeds more than exp (e.g. log_softmax)"
        x = _softmax_input(node)
        if x is None or x.target is not aten.where.self:
            return "softmax input is not masked (no masked_fill / where feeds it)"
        fills = [a for a in x.args[1:] if isinstance(a, torch.fx.Node) and a.target is aten.full.default]
        if fills and all(f.args[1] != NEG_INF for f in fills):
            return f"the fill is {fills[0].args[1]}, not -inf (an empty row would not be NaN as the op's)"
        if len(xs.users) > 2 or (x is not xs and len(x.users) > 1):
            return "the masked scores have another consumer"
        return ("the mask matches no search variant (an additive mask, or bounds that are not int32/int64)")
