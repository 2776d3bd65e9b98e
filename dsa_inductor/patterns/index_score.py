"""Rule ``index_score``: per-head ``q . k``, relu, scale, weighted sum over heads -> ``dsa_inductor::index_score``.

The idiom is the DSA lightning indexer's score (transformers' ``DeepseekV32Indexer.forward``; DeepSeek's
reference ``Indexer`` computes it with ``fp8_index``)::

    scores = torch.matmul(q.float(), k.transpose(-1, -2).float().unsqueeze(1)) * self.softmax_scale
    scores = F.relu(scores)
    index_scores = torch.matmul(weights.unsqueeze(-2), scores).squeeze(-2)

Eager materializes ``[B, S, H, T]`` fp32 scores (and, for transformers' broadcast matmul, a
``[B, S, D, T]`` fp32 copy of k).  Search variants are the product of

* a score form: ``matmul`` (transformers' spelling above) or ``einsum('bshd,btd->bsht', q.float(), k.float())``,
  each traced once on bf16 inputs (the ``.float()`` upcasts are nodes; they also match fp16) and once on
  fp32 inputs (the upcasts vanish);
* where the scale is: ``pre`` (``relu(x * scale)``), ``post`` (``relu(x) * scale``), ``none``;
* the head reduction: ``matmul`` (``weights.unsqueeze(-2) @ scores`` then ``squeeze``), ``mulsum``
  (``(scores * weights[..., None]).sum(dim=heads)``), ``einsum('bsht,bsh->bst')``;
* batch 1 or not (Dynamo specializes a batch of 1, and ``matmul`` / ``einsum`` decompose it differently).

``scale`` is captured with ``scalar_workaround``; the shared check requires it to be a number (a tensor
scale, per head or per position, is left alone).  The re-trace on the matched shapes checks every int (the
reduced dim, the permutations), so a sum over another dim never matches.  Per-head scores in bf16/fp16
(an einsum on un-upcast inputs) are left alone: the op computes them in fp32.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Optional

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .. import testing
from ..canonicalize import trace_joint
from ..lowerings import index_score as _op_module  # noqa: F401  (defines the op)
from ..report import stats_for
from .common import Rule, Variant, tensor_meta

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
    upcast: bool  # traced on bf16 inputs: the `.float()` upcasts are in the pattern
    scale: str
    reduce: str
    bs1: bool

    @property
    def name(self) -> str:
        return (f"{self.score}{'_upcast' if self.upcast else ''}:scale_{self.scale}:{self.reduce}"
                f"{':bs1' if self.bs1 else ''}")


def _activated(form: Form, x, scale):
    if form.scale == "pre":
        return torch.relu(x * scale)
    y = torch.relu(x)
    return y * scale if form.scale == "post" else y


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
        dt = torch.bfloat16 if form.upcast else torch.float32
        ex = [torch.empty(b, s, h, d, dtype=dt), torch.empty(b, t, d, dtype=dt), torch.empty(b, s, h)]
        return ex + ([SCALE_MAGIC] if has_scale else [])

    workaround = {"scale": SCALE_MAGIC} if has_scale else {}

    def compare(args, expected, actual):
        """Verify mode: the fp32 sum bound (``testing.index_score_tolerance``) against the eager subgraph."""
        q, k, w = args[:3]
        scale = args[3] if has_scale else 1.0
        return testing.score_mismatch(actual[0], expected[0], testing.index_score_tolerance(q, k, w, scale))

    return Variant(form.name, argnames, search, replace, example_inputs, workaround, compare=compare,
                   check=lambda m: _check(form, m), trace=trace_joint)


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
    if q.dtype not in _FLOATS + (torch.float8_e4m3fn,) or k.dtype != q.dtype:
        return (f"q / k dtypes {q.dtype} / {k.dtype}: the op takes one of float32/float16/bfloat16/float8_e4m3fn "
                "for both")
    if w.dim() != 3 or w.dtype not in _FLOATS or not all(
            statically_known_true(a == b) for a, b in zip(w.shape, q.shape[:3])):
        return (f"weights {tuple(w.shape)} {w.dtype} are not one float per [B, S, H] = {tuple(q.shape[:3])} "
                "(broadcast weights are not taken)")
    if not (statically_known_true(k.shape[0] == q.shape[0]) or statically_known_true(k.shape[0] == 1)):
        return f"k has batch {k.shape[0]}, q {q.shape[0]}"
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


def _from_bmm(node, depth=0) -> bool:
    if not isinstance(node, torch.fx.Node) or depth > 6:
        return False
    if node.target is aten.bmm.default:
        return True
    if node.target in (aten.reshape.default, aten.permute.default, aten.mul.Tensor, aten.div.Tensor,
                       prims.convert_element_type.default):
        return _from_bmm(node.args[0], depth + 1)
    return False


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


class IndexScoreRule(Rule):
    name = "index_score"
    op = "dsa_inductor::index_score"
    anchors = (aten.relu.default,)
    exact_retrace = True  # S, T, H, D all dynamic: see common.specific_mismatch

    def variants(self):
        for score, upcast, scale, reduce, bs1 in itertools.product(SCORE_FORMS, (True, False), SCALES,
                                                                   REDUCTIONS, (False, True)):
            yield _make_variant(Form(score, upcast, scale, reduce, bs1))

    def candidates(self, graph: torch.fx.Graph) -> list:
        """Relus of a batched matmul's output (4-d): the only relus this rule could rewrite."""
        return [n for n in graph.nodes if n.op == "call_function" and n.target is aten.relu.default
                and isinstance(_val(n), torch.Tensor) and _val(n).dim() == 4 and _from_bmm(n.args[0])]

    def apply(self, graph: torch.fx.Graph) -> int:
        if self.candidates(graph):
            _normalize_dims(graph)
        matched = super().apply(graph)
        if matched:
            from .mask_topk import bound_index_scores  # the chain: score -> range top-k

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
