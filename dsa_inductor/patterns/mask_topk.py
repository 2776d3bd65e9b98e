"""Rule ``mask_topk``: mask logits outside a per-row range or mask, then ``topk`` -> ``dsa_inductor::masked_topk``.

The idiom is the DSA indexer's token selection (DeepSeek-V3.2-Exp, arXiv 2512.02556; transformers'
``DeepseekV32Indexer.forward``; DeepSeek's reference ``inference/model.py`` ``Indexer``)::

    index_scores = index_scores.masked_fill(~attention_mask, float("-inf"))     # bool mask
    index_scores = index_scores + attention_mask                                # or additive 0/-inf mask
    pos = torch.arange(T); keep = (pos >= row_starts[:, None]) & (pos < row_ends[:, None])  # or a range
    topk_indices = index_scores.topk(min(index_topk, T), dim=-1).indices.to(torch.int32)

Search variants are the product of

* a mask form: ``range`` (both bounds), ``causal`` (``row_ends`` only), each as the kept positions
  (``~keep``) or the dropped ones (``range_drop``: ``(pos < row_starts) | (pos >= row_ends)``, ``causal_drop``:
  ``pos >= row_ends``, DeepSeek-V4's indexer with ``row_ends = (position_ids + 1) // compress_rate``);
  ``keep_mask`` (``~mask``),
  ``drop_mask`` (``mask`` marks dropped positions), each as ``masked_fill`` and, for keep forms, as
  ``torch.where(keep, logits, fill)``; and ``additive`` (``logits + bias``);
* the topk call: ``sorted=True`` (defaults) or ``sorted=False``;
* what is used: values and indices, indices, values, and indices cast to int32.

``k`` and the fill value are captured with ``scalar_workaround``; every other int in a search pattern
(arange length, unsqueeze dims, topk ``dim=-1``) is checked exactly by the re-trace on the matched shapes,
so a ``<=`` bound, an offset arange or a topk over another dim never matches.
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
from typing import Callable, Optional

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .. import testing
from ..lowerings import masked_topk as _op_module  # noqa: F401  (defines the op)
from ..report import stats_for
from .common import Rule, Variant, sym_size, tensor_meta

aten = torch.ops.aten
K_MAGIC = 13  # stands for `k` while tracing; any int the search traces with this value becomes `k`
FILL_MAGIC = -7777.5  # stands for the fill value while tracing
N_MAGIC = 61  # stands for the arange length (the example logits' last dim) while tracing


@dataclasses.dataclass(frozen=True)
class MaskForm:
    name: str
    tensors: tuple[str, ...]  # tensor inputs after `logits`
    masked: Callable  # (logits, *tensors, fill) -> masked logits (eager spelling)
    op_args: Callable  # (*tensors) -> dict of masked_topk keyword arguments
    has_fill: bool = True
    has_n: bool = False  # takes the arange length `n` as a scalar input


def _pos(logits, n):
    # ``torch.arange(n)`` as post-grad graphs hold it.  Tracing arange itself would record its length
    # arithmetic ((n - 0 + 1 - 1) // 1) on a symbolic n, which Dynamo's graphs have already simplified.
    # `n` is a pattern input (not logits.shape[-1]) because a dynamic graph passes T as its own SymInt;
    # `_check` makes sure it equals the last dim of the logits.
    return torch.ops.prims.iota(n, start=0, step=1, dtype=torch.int64, device=logits.device, requires_grad=False)


def _range_keep(logits, row_starts, row_ends, n):
    pos = _pos(logits, n)
    return (pos >= row_starts.unsqueeze(-1)) & (pos < row_ends.unsqueeze(-1))


def _causal_keep(logits, row_ends, n):
    return _pos(logits, n) < row_ends.unsqueeze(-1)


def _range_drop(logits, row_starts, row_ends, n):
    pos = _pos(logits, n)
    return (pos < row_starts.unsqueeze(-1)) | (pos >= row_ends.unsqueeze(-1))


def _causal_drop(logits, row_ends, n):
    return _pos(logits, n) >= row_ends.unsqueeze(-1)


MASK_FORMS = (
    MaskForm("range", ("row_starts", "row_ends"),
             lambda x, s, e, n, fill: x.masked_fill(~_range_keep(x, s, e, n), fill),
             lambda s, e: dict(row_starts=s, row_ends=e), has_n=True),
    MaskForm("range_where", ("row_starts", "row_ends"),
             lambda x, s, e, n, fill: torch.where(_range_keep(x, s, e, n), x, fill),
             lambda s, e: dict(row_starts=s, row_ends=e), has_n=True),
    MaskForm("causal", ("row_ends",),
             lambda x, e, n, fill: x.masked_fill(~_causal_keep(x, e, n), fill),
             lambda e: dict(row_ends=e), has_n=True),
    MaskForm("causal_where", ("row_ends",),
             lambda x, e, n, fill: torch.where(_causal_keep(x, e, n), x, fill),
             lambda e: dict(row_ends=e), has_n=True),
    MaskForm("range_drop", ("row_starts", "row_ends"),
             lambda x, s, e, n, fill: x.masked_fill(_range_drop(x, s, e, n), fill),
             lambda s, e: dict(row_starts=s, row_ends=e), has_n=True),
    MaskForm("causal_drop", ("row_ends",),
             lambda x, e, n, fill: x.masked_fill(_causal_drop(x, e, n), fill),
             lambda e: dict(row_ends=e), has_n=True),
    MaskForm("keep_mask", ("mask",),
             lambda x, m, fill: x.masked_fill(~m, fill),
             lambda m: dict(mask=m, mask_keeps=True)),
    MaskForm("keep_mask_where", ("mask",),
             lambda x, m, fill: torch.where(m, x, fill),
             lambda m: dict(mask=m, mask_keeps=True)),
    MaskForm("drop_mask", ("mask",),
             lambda x, m, fill: x.masked_fill(m, fill),
             lambda m: dict(mask=m, mask_keeps=False)),
    MaskForm("additive", ("bias",),
             lambda x, b: x + b,
             lambda b: dict(bias=b), has_fill=False),
)

# name -> (uses values, uses indices, index dtype of the used indices)
OUTPUTS = {
    "values_indices": (True, True, torch.int64),
    "values_indices_int32": (True, True, torch.int32),
    "indices_int32": (False, True, torch.int32),
    "indices": (False, True, torch.int64),
    "values": (True, False, torch.int64),
}


def _topk(x, k, sorted_):
    if sorted_:
        return torch.topk(x, k)
    return torch.topk(x, k, dim=-1, largest=True, sorted=False)


def _select_outputs(values, indices, output):
    uses_values, uses_indices, index_dtype = OUTPUTS[output]
    if uses_indices and index_dtype != torch.int64 and indices.dtype != index_dtype:
        indices = indices.to(index_dtype)
    if uses_values and uses_indices:
        return values, indices
    return values if uses_values else indices


def _make_variant(form: MaskForm, sorted_: bool, output: str) -> Variant:
    scalars = (("n",) if form.has_n else ()) + ("k",) + (("fill",) if form.has_fill else ())
    argnames = ("logits", *form.tensors, *scalars)
    n_t = 1 + len(form.tensors)
    uses_values, _, index_dtype = OUTPUTS[output]

    def split(args):
        named = dict(zip(scalars, args[n_t:]))
        return args[0], args[1:n_t], named

    def search(*args):
        logits, tensors, sc = split(args)
        extra = ([sc["n"]] if form.has_n else []) + ([sc["fill"]] if form.has_fill else [])
        values, indices = _topk(form.masked(logits, *tensors, *extra), sc["k"], sorted_)
        return _select_outputs(values, indices, output)

    def replace(*args):
        logits, tensors, sc = split(args)
        k = sc["k"]
        fill = sc.get("fill", float("-inf"))
        kw = dict(row_starts=None, row_ends=None, mask=None, mask_keeps=True, bias=None)
        kw.update(form.op_args(*tensors))
        values, indices = torch.ops.dsa_inductor.masked_topk(
            logits, k, kw["row_starts"], kw["row_ends"], kw["mask"], kw["mask_keeps"], kw["bias"], fill,
            sorted_, index_dtype, uses_values)
        return _select_outputs(values, indices, output)

    def example_inputs():
        r, n = 4, N_MAGIC
        ex = {"logits": torch.empty(r, n), "row_starts": torch.empty(r, dtype=torch.int64),
              "row_ends": torch.empty(r, dtype=torch.int64), "mask": torch.empty(r, n, dtype=torch.bool),
              "bias": torch.empty(r, n)}
        magic = {"n": N_MAGIC, "k": K_MAGIC, "fill": FILL_MAGIC}
        return [ex["logits"], *(ex[t] for t in form.tensors), *(magic[s] for s in scalars)]

    def compare(args, expected, actual):
        """Verify mode: the top-k contract (``testing.topk_mismatch``) against the eager subgraph."""
        logits, tensors, sc = split(args)
        extra = ([sc["n"]] if form.has_n else []) + ([sc["fill"]] if form.has_fill else [])
        uses_values, uses_indices, _ = OUTPUTS[output]
        if not uses_indices:
            return testing.topk_values_mismatch(actual[0], expected[0], sorted_)
        indices = actual[-1]
        if indices.dtype != expected[-1].dtype:
            return f"indices are {indices.dtype}, eager's {expected[-1].dtype}"
        masked = form.masked(logits, *tensors, *extra)
        return testing.topk_mismatch(masked, sc["k"], actual[0] if uses_values else None, indices, sorted_,
                                     uses_values)

    workaround = {s: {"n": N_MAGIC, "k": K_MAGIC, "fill": FILL_MAGIC}[s] for s in scalars}
    name = f"{form.name}:{'sorted' if sorted_ else 'unsorted'}:{output}"
    return Variant(name, argnames, search, replace, example_inputs, workaround, check=_check, compare=compare)


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


_COMPARISONS = (aten.lt.Tensor, aten.le.Tensor, aten.gt.Tensor, aten.ge.Tensor)
_MASK_LOGIC = (aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.bitwise_not.default,
               aten.logical_and.default, aten.logical_or.default, aten.logical_not.default)


def _from_iota(node, depth=0) -> bool:
    """Is ``node`` arange(...) itself, up to unsqueeze/expand/add-a-constant?"""
    if not isinstance(node, torch.fx.Node) or depth > 6:
        return False
    if node.target is torch.ops.prims.iota.default:
        return True
    if node.target in (aten.unsqueeze.default, aten.expand.default, aten.reshape.default, aten.add.Tensor,
                       aten.sub.Tensor):
        return _from_iota(node.args[0], depth + 1)
    return False


def _row_bound_comparison(node, depth=0) -> bool:
    """Is ``node`` a logic combination of ``arange`` compared with a per-row bound tensor?

    Such a mask is the range idiom; when it reaches the generic mask variants, no range variant took it
    (a ``<=`` bound, an offset arange, ...): it is left alone rather than read as a materialized mask.
    """
    if not isinstance(node, torch.fx.Node) or depth > 4:
        return False
    if node.target in _MASK_LOGIC:
        return any(_row_bound_comparison(a, depth + 1) for a in node.args)
    if node.target in _COMPARISONS:
        a, b = node.args[:2]
        return _from_iota(a) != _from_iota(b) and isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)
    return False


def _check(match) -> Optional[str]:
    """Shared checks on the matched (re-traced) values; returns a rejection reason or None."""
    logits = tensor_meta(match, "logits")
    if logits is None or logits.dtype not in _FLOATS:
        return f"logits dtype {getattr(logits, 'dtype', None)} is not float32/float16/bfloat16"
    for node in match.nodes:  # the arange length, read from the node (torch 2.11 drops scalar kwargs here)
        if node.target is torch.ops.prims.iota.default:
            n = node.args[0]
            n = n.meta.get("val") if isinstance(n, torch.fx.Node) else n
            if not statically_known_true(n == logits.shape[-1]):
                return f"the arange length {n} is not the last dim of the logits ({logits.shape[-1]})"
    for name in ("row_starts", "row_ends"):
        t = tensor_meta(match, name)
        if t is not None and t.dtype not in (torch.int32, torch.int64):
            return f"{name} dtype {t.dtype} is not int32/int64"
    mask = match.kwargs.get("mask")
    if _row_bound_comparison(mask):
        return ("the mask compares arange with per-row bounds in a form no range variant takes "
                "(e.g. a <= bound, or an offset arange)")
    for node in match.nodes:  # the additive form's `logits + bias` (no other form has an add)
        if node.target is not aten.add.Tensor:
            continue
        bias = node.args[1].meta.get("val") if isinstance(node.args[1], torch.fx.Node) else None
        if not isinstance(bias, torch.Tensor):  # `logits + 1.5`: a number, not a mask (the op takes a tensor)
            return f"the additive term {node.args[1]!r} is not a tensor"
        if bias.dim() == 0:
            return "additive mask is a 0-d tensor, not a per-position mask"
        if not bias.dtype.is_floating_point:  # an int / bool term promotes, but the op adds a float mask
            return f"additive mask has dtype {bias.dtype}, not a floating-point 0/-inf mask"
        if torch.promote_types(logits.dtype, bias.dtype) not in _FLOATS:
            return f"logits + bias has dtype {torch.promote_types(logits.dtype, bias.dtype)}"
    return None


_INDEX_CASTS = (torch.int32, torch.int64)  # indices < 2**31 survive these casts unchanged

_POSITIONWISE = {  # elementwise ops: out[..., j] depends on the inputs' [..., j] only
    aten.ge.Tensor, aten.gt.Tensor, aten.le.Tensor, aten.lt.Tensor, aten.eq.Tensor, aten.ne.Tensor,
    aten.ge.Scalar, aten.gt.Scalar, aten.le.Scalar, aten.lt.Scalar, aten.eq.Scalar, aten.ne.Scalar,
    aten.where.self, aten.add.Tensor, aten.sub.Tensor, aten.bitwise_not.default, aten.logical_not.default,
    aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.logical_and.default, aten.logical_or.default,
    torch.ops.prims.convert_element_type.default,
}


def _same_along_last(arg, last: int) -> bool:
    """``arg`` is the same at every position of the last dim (of a result with ``last`` dims): a number,
    a tensor of size 1 there (or of fewer dims), or a constant ``full``."""
    if not isinstance(arg, torch.fx.Node):
        return True
    val = arg.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return False
    if arg.target is aten.full.default or val.dim() == 0:
        return True
    return val.dim() <= last and statically_known_true(val.shape[-1] == 1)


def _order_unobservable(node: torch.fx.Node) -> bool:
    """Do all uses of ``node`` (top-k indices) ignore their order along the last dim?

    True when every path from ``node`` runs through position-wise ops (casts, comparisons, ``where``,
    add / sub, logic), whose other operands are the same at every position of the last dim (numbers, tensors
    of size 1 there, constant ``full``s) or position-wise functions of ``node`` themselves, or ``unsqueeze``
    of another dim, into ``scatter(x, -1, indices, value)`` with a scalar value: writing one value at a set of
    positions does not depend on their order.  This is how transformers' ``DeepseekV32Attention`` turns the
    indexer's selection into a mask, and DeepSeek-V4's CSA compressor its block bias (after
    ``where(idx >= row_ends, -1, idx)`` and ``where(idx >= 0, idx, T)``).
    """
    val = node.meta.get("val")
    if val is None or not node.users:
        return False
    last = val.dim()
    derived = {node: last}  # node -> its rank (the k positions are its last dim)
    pending = set(node.users)
    for user in node.graph.nodes:  # topological order: a node's derived operands are classified first
        if user not in pending:
            continue
        pending.discard(user)
        tensors = [a for a in (*user.args, *user.kwargs.values()) if isinstance(a, torch.fx.Node)]
        mine = [a for a in tensors if a in derived]
        out = user.meta.get("val")
        if user.target is aten.scatter.value and user.args[2] in derived and user.args[0] not in derived \
                and not isinstance(user.args[3], torch.fx.Node):
            if user.args[1] not in (-1, derived[user.args[2]] - 1):
                return False
            continue
        if not isinstance(out, torch.Tensor):
            return False
        if user.target is aten.unsqueeze.default and user.args[1] not in (-1, out.dim() - 1) or \
                user.target in _POSITIONWISE and all(a in derived or _same_along_last(a, out.dim()) for a in tensors):
            if any(derived[a] != out.dim() for a in mine if user.target is not aten.unsqueeze.default):
                return False  # a broadcast that moves the k positions off the last dim
            derived[user] = out.dim()
            pending.update(user.users)
            continue
        return False
    return not pending


def relax_unobservable_order(graph: torch.fx.Graph, stats) -> int:
    """``sorted=True`` -> ``sorted=False`` on fused top-k nodes whose order no consumer can observe."""
    relaxed = 0
    for node in graph.nodes:
        if node.target is not torch.ops.dsa_inductor.masked_topk.default or node.args[8] is not True:
            continue
        if node.args[10] is not False:  # values are produced: their order is observable
            continue
        index_users = [u for u in node.users if u.target is operator.getitem and u.args[1] == 1]
        if len(index_users) == len(node.users) and all(_order_unobservable(u) for u in index_users):
            args = list(node.args)
            args[8] = False
            node.args = tuple(args)
            relaxed += 1
            stats.notes["sorted -> unsorted: the indices are only scattered, their order is unobservable"] += 1
    return relaxed


def _iota_offset(node, n, dim=-1):
    """If ``node`` is ``arange(n) + c`` laid along ``dim`` (the last by default; all other dims 1), return the
    terms of c.

    ``c`` is a sum of ints and SymInt nodes (Dynamo makes ints dynamic): a list of ``(sign, term)``.
    """
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if val is None or val.dim() < -dim or \
            any(not statically_known_true(d == 1) for i, d in enumerate(val.shape) if i != val.dim() + dim):
        return None
    terms = []
    while isinstance(node, torch.fx.Node):
        if node.target is aten.unsqueeze.default:
            node = node.args[0]
        elif node.target in (aten.add.Tensor, aten.sub.Tensor) and not node.kwargs and (
                isinstance(node.args[1], int) or (isinstance(node.args[1], torch.fx.Node) and isinstance(
                    node.args[1].meta.get("val"), (int, torch.SymInt)))):
            terms.append((1 if node.target is aten.add.Tensor else -1, node.args[1]))
            node = node.args[0]
        elif node.target is torch.ops.prims.iota.default:
            kw = node.kwargs
            ok = (kw.get("start") == 0 and kw.get("step") == 1 and
                  statically_known_true(node.meta["val"].shape[0] == n))
            return terms if ok else None
        else:
            return None
    return None


# For ``kv OP r`` with kv = arange + c along the last dim: (bound kind, what to add to r - c).
_BOUND_OF = {aten.le.Tensor: ("ends", 1), aten.lt.Tensor: ("ends", 0),
             aten.ge.Tensor: ("starts", 0), aten.gt.Tensor: ("starts", 1)}
_MIRROR = {aten.le.Tensor: aten.ge.Tensor, aten.lt.Tensor: aten.gt.Tensor,
           aten.ge.Tensor: aten.le.Tensor, aten.gt.Tensor: aten.lt.Tensor}


_NEGATE = {aten.le.Tensor: aten.gt.Tensor, aten.lt.Tensor: aten.ge.Tensor,
           aten.ge.Tensor: aten.lt.Tensor, aten.gt.Tensor: aten.le.Tensor}


def _comparison_bound(node, n, negate=False):
    """``kv OP r`` (either side) -> ``(kind, r, terms)`` with ``bound = r + sum(terms)``; else None.

    ``negate``: the bound of ``not (kv OP r)`` (a drop mask's comparison)."""
    if not isinstance(node, torch.fx.Node) or node.target not in _BOUND_OF:
        return None
    for op, kv, r in ((node.target, *node.args[:2]), (_MIRROR[node.target], *reversed(node.args[:2]))):
        op = _NEGATE[op] if negate else op
        offset = _iota_offset(kv, n)
        r_val = r.meta.get("val") if isinstance(r, torch.fx.Node) else None
        if offset is None or not isinstance(r_val, torch.Tensor) or _iota_offset(r, n) is not None:
            continue
        if r_val.dtype not in (torch.int32, torch.int64) or r_val.dim() == 0 or \
                not statically_known_true(r_val.shape[-1] == 1):  # a 0-d bound: no per-row side to peel
            continue
        kind, plus = _BOUND_OF[op]
        # t + c <= r <=> t < r - c + 1;  t + c < r <=> t < r - c;  t + c >= r <=> t >= r - c;  > : + 1
        return kind, r, [(1, plus)] + [(-sign, term) for sign, term in offset]
    return None


def _mask_as_bounds(mask, negate=False, row_len=None):
    """Recognize ``mask = view-ops(bound comparisons of arange(T) + c)`` and say how to compute the bounds.

    transformers builds its causal mask as ``kv_idx <= q_idx`` from aranges, expands it over the batch
    and selects the head dim; a windowed mask is ``(kv >= lo) & (kv < hi)``.  Returns
    ``(peels, {"starts"|"ends": (r, terms)}, rank)`` with
    ``bound = peels(r unsqueezed to rank).squeeze(-1) + sum(terms)``, or None.
    ``negate``: ``mask`` marks dropped positions, ``(kv > hi) | (kv < lo)`` (De Morgan).
    ``row_len``: the last dim of the tensor the mask applies to.  A mask that broadcasts along it (e.g.
    ``arange(1)`` compared, ``[S, 1]``) keeps or drops whole rows: no bounds (None).
    """
    if row_len is not None and not statically_known_true(mask.meta["val"].shape[-1] == row_len):
        return None
    peels = []
    node = mask
    while isinstance(node, torch.fx.Node) and node.target in (aten.select.int, aten.expand.default):
        val = node.args[0].meta.get("val")
        if val is None:
            return None
        if node.target is aten.select.int:
            if node.args[1] % val.dim() == val.dim() - 1:
                return None
        else:
            last = node.args[1][-1]
            last = last.meta.get("val") if isinstance(last, torch.fx.Node) else last
            if len(node.args[1]) != val.dim() or not (last == -1 or statically_known_true(last == val.shape[-1])):
                return None
        peels.append(node)
        node = node.args[0]
    if not isinstance(node, torch.fx.Node):
        return None
    n = mask.meta["val"].shape[-1]
    joins = (aten.bitwise_or.Tensor, aten.logical_or.default) if negate else (aten.bitwise_and.Tensor,
                                                                               aten.logical_and.default)
    parts = _join_parts(node, joins, neutral=not negate)
    if not parts:
        return None
    bounds = {}
    for part in parts:
        found = _comparison_bound(part, n, negate)
        if found is None or found[0] in bounds:
            return None
        bounds[found[0]] = found[1:]
    # The peels index dims of the comparison's result: the per-row side must have its rank to take them.
    return list(reversed(peels)), bounds, node.meta["val"].dim()


def _join_parts(node, joins, neutral: bool) -> list:
    """The terms of a (nested) ``&`` (or ``|``) of masks, without constant ``neutral`` ones: transformers'
    sliding-window mask is ``(True & (kv > q - w)) & (kv <= q)``."""
    if isinstance(node, torch.fx.Node) and node.target in joins:
        return [p for a in node.args[:2] for p in _join_parts(a, joins, neutral)]
    if isinstance(node, bool) and node is neutral:
        return []
    if (isinstance(node, torch.fx.Node) and node.target is aten.full.default and node.args[1] is neutral
            and not node.meta["val"].shape):
        return []
    return [node]


def mask_to_row_bounds(graph: torch.fx.Graph, stats) -> int:
    """Replace a fused top-k's bool mask by ``row_starts``/``row_ends`` when it is an arange comparison.

    The op then reads no mask, and rows with at most k kept positions take the short-circuit.  The mask
    itself stays for its other users (transformers also feeds it to attention).
    """
    done = 0
    for node in list(graph.nodes):
        if node.target is not torch.ops.dsa_inductor.masked_topk.default:
            continue
        logits, k, starts, ends, mask, keeps, bias = node.args[:7]
        if mask is None or not keeps or starts is not None or ends is not None or bias is not None:
            continue
        found = _mask_as_bounds(mask, row_len=logits.meta["val"].shape[-1])
        if found is None:
            continue
        replace_mask_by_bounds(graph, node, found, starts_at=2, mask_at=4, stats=stats)
        done += 1
    if done:
        graph.eliminate_dead_code()
    return done


def replace_mask_by_bounds(graph, node, found, starts_at: int, mask_at: int, stats) -> None:
    """Rewrite the fused op ``node``: its mask argument (``args[mask_at]``) becomes None and the bounds
    ``found`` by ``_mask_as_bounds`` go to ``args[starts_at]`` (row_starts) / ``args[starts_at + 1]``
    (row_ends).  Shared by the mask_topk and windowed_softmax rules."""
    peels, bounds, rank = found
    args = list(node.args)
    for kind, (row, terms) in bounds.items():
        with graph.inserting_before(node), row.meta["val"].fake_mode:
            args[starts_at if kind == "starts" else starts_at + 1] = _bound_node(graph, row, peels, terms, rank)
    args[mask_at] = None
    node.args = tuple(args)
    stats.notes[f"bool mask -> {' and '.join(f'row_{b}' for b in sorted(bounds))}: the mask is an "
                "arange comparison, no mask read"] += 1


def _bound_node(graph, row, peels, terms, rank):
    """``peels(row unsqueezed to rank).squeeze(-1) + sum(terms)`` as new graph nodes."""
    cur = row
    for _ in range(rank - row.meta["val"].dim()):
        cur = _new_node(graph, aten.unsqueeze.default, (cur, 0))
    for peel in peels:
        args = list(peel.args)
        args[0] = cur
        if peel.target is aten.expand.default:
            args[1] = [*args[1][:-1], -1]
        cur = _new_node(graph, peel.target, tuple(args))
    cur = _new_node(graph, aten.squeeze.dim, (cur, -1))
    const = sum(sign * term for sign, term in terms if isinstance(term, int))
    if const:
        cur = _new_node(graph, aten.add.Tensor, (cur, const))
    for sign, term in terms:
        if isinstance(term, torch.fx.Node):
            cur = _new_node(graph, aten.add.Tensor if sign > 0 else aten.sub.Tensor, (cur, term))
    return cur


def _new_node(graph, target, args, kwargs=None):
    """A new ``call_function`` node with its fake value (the caller holds the fake mode and insertion point)."""
    kwargs = kwargs or {}
    vals, kvals = torch.fx.node.map_arg((args, kwargs), lambda a: a.meta["val"])
    new = graph.call_function(target, args, kwargs)
    new.meta["val"] = target(*vals, **kvals)
    return new


def _permutation_scatters(node: torch.fx.Node, n) -> Optional[list]:
    """The ``scatter(x, -1, indices, value)`` nodes fed by ``node`` (top-k indices, through index casts)
    whose ``x`` has the indices' shape but for the last dim, which is the top-k's ``n`` (so that with
    ``k == n`` the shapes are equal); None if any use is something else."""
    found = []
    for user in node.users:
        if user.target is torch.ops.prims.convert_element_type.default and user.args[1] in _INDEX_CASTS:
            sub = _permutation_scatters(user, n)
            if sub is None:
                return None
            found += sub
        elif user.target is aten.scatter.value and user.args[2] is node and not isinstance(user.args[3],
                                                                                               torch.fx.Node):
            idx, x = node.meta.get("val"), user.args[0].meta.get("val")
            if idx is None or x is None or user.args[1] not in (-1, idx.dim() - 1) or x.dim() != idx.dim() or \
                    not all(statically_known_true(a == b) for a, b in zip(x.shape[:-1], idx.shape[:-1])) or \
                    not statically_known_true(x.shape[-1] == n):
                return None
            found.append(user)
        else:
            return None
    return found


def _k_is_n(k, n) -> bool:
    """``k == n``: statically, or (dynamic ``k = min(index_topk, T)``) when this compile's sizes say so, then
    guarded: a later call with ``T > index_topk`` recompiles once (Dynamo guards every shape decision).
    A compile whose sizes say ``k < n`` adds no guard."""
    if statically_known_true(k == n):
        return True
    # Only k = min(c, N) (transformers' `min(index_topk, T)`): the guard is then `N <= c`, a range.  A
    # constant k would specialize N to it.
    expr = k.node.expr if isinstance(k, torch.SymInt) else None
    if expr is None or type(expr).__name__ != "Min" or not isinstance(n, torch.SymInt) or \
            n.node.expr not in expr.args:
        return False
    eq = k == n
    if not isinstance(eq, torch.SymBool) or getattr(eq.node, "hint", None) is not True:
        return False
    from torch.fx.experimental.symbolic_shapes import guard_or_false

    return bool(guard_or_false(eq))


def scatter_of_full_topk(graph: torch.fx.Graph, stats) -> int:
    """``scatter(x, -1, topk_indices, v)`` -> ``full(x.shape, v)`` when the top-k takes all N positions.

    With ``k == N`` (statically: transformers' ``topk = min(index_topk, T)`` once ``T <= index_topk``),
    each row of indices is a permutation of ``[0, N)`` (distinct valid indices), so the scatter writes
    ``v`` everywhere.  This is issue 4's short-sequence shortcut at graph level: the DSA index mask is
    then constant (nothing masked), the indexer (index score, top-k) is dead code, and attention is the
    plain causal one; no host sync, since it is decided from shapes (guarded by Dynamo like any shape).
    """
    done = 0
    for node in list(graph.nodes):
        if node.target is not torch.ops.dsa_inductor.masked_topk.default or node.args[10] is not False:
            continue
        logits, k = node.args[0], node.args[1]
        k = k.meta.get("val") if isinstance(k, torch.fx.Node) else k
        n = logits.meta["val"].shape[-1]
        index_users = [u for u in node.users if u.target is operator.getitem and u.args[1] == 1]
        if len(index_users) != len(node.users):
            continue
        scatters = []
        for u in index_users:
            sub = _permutation_scatters(u, n)
            if sub is None:
                scatters = None
                break
            scatters += sub
        # the shape decision last: it may add a Dynamo guard, which only a graph that uses it should carry
        if not scatters or not _k_is_n(k, n):
            continue
        for sc in scatters:
            x = sc.args[0]
            xv = x.meta["val"]
            with graph.inserting_before(sc):
                size = [sym_size(graph, x, i) for i in range(xv.dim())]
                full = graph.call_function(aten.full.default, (size, sc.args[3]),
                                           dict(dtype=xv.dtype, layout=torch.strided, device=xv.device,
                                                pin_memory=False))
                full.meta["val"] = sc.meta["val"]
            sc.replace_all_uses_with(full)
            graph.erase_node(sc)
        done += 1
        stats.notes["top-k of all N positions only scattered: scatter -> full (short sequence: no indexer "
                    "work)"] += 1
    if done:
        graph.eliminate_dead_code()
    return done


def _index_score_op():
    return torch.ops.dsa_inductor.index_score.default


def bound_index_scores(graph: torch.fx.Graph, stats) -> int:
    """Pass a range top-k's bounds into the index score that feeds it (the lightning indexer chain).

    ``masked_topk(index_score(q, k, w, ...), k, row_starts, row_ends, mask=None, bias=None, fill=-inf)``
    reads its logits only inside each row's ``[row_start, row_end)``, and not at all in a row of at most
    ``k`` in-range positions when it writes no values (``sorted=False``, ``need_values=False``).  The index
    score then gets the same bounds with ``outside_undefined=True``: its kernel skips key tiles outside
    every range of a row tile (causal rows: about half the work) and, with ``short_k = k``, whole short
    rows, and leaves those entries unwritten.  Applied only when the top-k is the scores' ONLY user: any
    other consumer would read undefined entries.
    """
    from .index_score import score_args, set_score_args

    done = 0
    for node in list(graph.nodes):
        if node.target is not torch.ops.dsa_inductor.masked_topk.default:
            continue
        logits, k, starts, ends, mask, _keeps, bias, fill, sorted_, _idt, need_values = node.args
        if not isinstance(logits, torch.fx.Node) or logits.target is not _index_score_op():
            continue
        if mask is not None or bias is not None or fill != float("-inf") or (starts is None and ends is None):
            continue
        if len(logits.users) != 1 or [a for a in node.args if a is logits] != [logits] or node.kwargs:
            stats.notes["index score -> range top-k: bounds not passed, the scores have another user"] += 1
            continue
        args = score_args(logits)
        if args is None or args[5] is not None or args[6] is not None or args[8]:
            continue
        scores = logits.meta["val"]
        q_node = args[0]
        bounds = []
        for bound in (ends, starts):
            if bound is None:
                bounds.append(None)
                continue
            val = bound.meta.get("val") if isinstance(bound, torch.fx.Node) else None
            if val is None or val.dtype not in (torch.int32, torch.int64) or val.dim() > 2 or not all(
                    statically_known_true(a == 1) or statically_known_true(a == b)
                    for a, b in zip(reversed(val.shape), reversed(scores.shape[:-1]))):
                bounds = None
                break
            if val.dim() != 2 or not all(statically_known_true(a == b) for a, b in zip(val.shape, scores.shape)):
                with graph.inserting_before(node), val.fake_mode:
                    size = [sym_size(graph, q_node, 0), sym_size(graph, q_node, 1)]
                    bound = _new_node(graph, aten.expand.default, (bound, size))
            bounds.append(bound)
        if bounds is None:
            continue
        # Short rows are skipped only when masked_topk's short-circuit reads no score (no values written).
        skip_short = sorted_ is False and need_values is False
        set_score_args(logits, (*args[:5], bounds[0], bounds[1], k if skip_short else -1, True, *args[9:]))
        # The bounds are computed before the top-k, maybe after the score: the score moves right before
        # its only user (its own inputs precede it already).
        node.prepend(logits)
        done += 1
        stats.notes["index score -> range top-k: bounds passed to the score kernel (out-of-range tiles"
                    + (" and short rows" if skip_short else "") + " skipped)"] += 1
    return done


class MaskTopkRule(Rule):
    name = "mask_topk"
    op = "dsa_inductor::masked_topk"
    anchors = (aten.topk.default,)

    def variants(self):
        for form, sorted_, output in itertools.product(MASK_FORMS, (True, False), OUTPUTS):
            yield _make_variant(form, sorted_, output)

    def apply(self, graph: torch.fx.Graph) -> int:
        matched = super().apply(graph)
        if matched:
            mask_to_row_bounds(graph, stats_for(self.name, self.op))
            relax_unobservable_order(graph, stats_for(self.name, self.op))
            scatter_of_full_topk(graph, stats_for(self.name, self.op))
            bound_index_scores(graph, stats_for(self.name, self.op))
        return matched

    def diagnose(self, node: torch.fx.Node) -> str:
        x = node.args[0]
        val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        rank = val.dim() if isinstance(val, torch.Tensor) else None
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", -1)
        largest = node.args[3] if len(node.args) > 3 else node.kwargs.get("largest", True)
        if largest is not True:
            return "topk(largest=False): the rule selects the largest entries"
        if dim != -1:
            return (f"topk over dim {dim}, spelled as a positive index" if rank is not None and dim == rank - 1
                    else f"topk over dim {dim}, not the last dim")
        if not isinstance(x, torch.fx.Node) or x.target not in (aten.where.self, aten.add.Tensor):
            return "topk input is not masked (no masked_fill / where / additive mask feeds it)"
        if len(x.users) > 1:
            return "the masked logits have another consumer"
        users = {u.target for u in node.users}
        if any(t is not operator.getitem for t in users):
            return "topk result is used other than through values/indices"
        return "the mask expression matches no search variant (e.g. a <= bound, or an offset arange)"
