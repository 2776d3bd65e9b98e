"""Rule ``gather_dequant``: a quantized K cache gathered by slot / page, then scaled -> ``dsa_inductor::gather_dequant``.

The idiom is the read side of the DSA indexer's FP8 K cache (DeepSeek-V3.2-Exp's reference ``Indexer``
keeps ``k_cache`` in FP8 with a per-token fp32 ``k_scale_cache``; vLLM's ``indexer_k_quant_and_cache`` /
``cp_gather_indexer_k_quant_cache`` store the scales inline after each page's FP8 bytes)::

    idx = slot_mapping.clamp(min=0)
    k = k_cache[idx].view(torch.float8_e4m3fn).float() * k_scale[idx].unsqueeze(-1)
    k = torch.where((slot_mapping < 0).unsqueeze(-1), 0.0, k)            # padding slots
    k = k.to(torch.bfloat16)                                               # optional

Search variants (the core: gather, decode, scale) are the product of

* how the FP8 bytes become floats: ``u8_before`` (``cache.view(float8_e4m3fn)[idx]``), ``u8_after``
  (``cache[idx].view(float8_e4m3fn)``), ``fp8`` (the cache is already float8_e4m3fn), then ``.float()``;
* the addressing: one index (``cache[slot]`` on ``[P, D]``, or ``cache[page]`` on ``[P, B, D]``, also
  ``index_select``) or two (``cache[page, pos]`` on ``[P, B, D]``), the scale gathered with the *same*
  index nodes;
* the scale's shape: ``token`` (``s[idx].unsqueeze(-1)``), ``keepdim`` (``s[idx]`` is ``[..., 1]``) or
  ``group`` (``(k.unflatten(-1, (G, D // G)) * s[idx].unsqueeze(-1)).flatten(-2)``, block scales);
* the scale's decoding: ``raw`` (fp32, or a bf16/fp16 scale promoted by the multiply), ``cast``
  (``s.float()``), ``e8m0`` (UE8M0 bytes, ``s.view(torch.float8_e8m0fnu).float()``) or ``f32_bytes``
  (fp32 scales kept as uint8 until after the gather, ``s[idx].view(torch.float32)`` on ``[..., 4 * G]``
  bytes: the inline page layout as the lifted per-token loop reads it; matched where the byte table
  itself provably has an fp32 view, i.e. 4-aligned offset and strides).

The multiply is commutative; the rule puts the FP8 operand first before matching.  After the core match,
follow-up rewrites (listed under ``then`` in the report) fold into the op, without changing any value:

* ``index0 = x // B`` and ``index1 = x % B`` with ``B`` the page size: slot addressing (no index kernel);
* ``where(mask, 0, k)`` / ``masked_fill(mask, 0)`` / ``where(keep, k, 0)`` with a per-token mask (the
  zero a scalar or a zeros tensor of the result's shape, the mask ``unsqueeze``d or reshaped to it):
  ``drop``; when the mask is ``slot < 0`` and the index is ``slot`` or ``slot.clamp(min=0)``,
  ``zero_negative`` on the raw slots;
* a final ``.to(bfloat16 / float16)``: ``out_dtype`` (the op rounds the same fp32 product once);
* scales that are ``view(torch.float32)`` of the cache's bytes (the inline page layout): the bytes, with
  ``scale_bytes`` (the op takes the view; Inductor would copy the whole strided byte table to take it).

Checks reject near misses: another FP8 format or target dtype (re-traced exactly), a scale gathered
with other indices (no match), a scale that broadcasts along another dim than the scale groups, bool
(mask) indices, and shapes where the multiply broadcasts beyond the gathered rows.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
from typing import Optional

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..lowerings import gather_dequant as _op_module  # noqa: F401  (defines the op)
from ..report import stats_for
from ..verify import exact_compare
from .common import Rule, Variant, tensor_meta

aten = torch.ops.aten
prims = torch.ops.prims
_E8M0 = getattr(torch, "float8_e8m0fnu", None)
_INT = (torch.int32, torch.int64)
_FLOAT_SCALES = (torch.float32, torch.bfloat16, torch.float16)

VALUE_FORMS = ("u8_before", "u8_after", "fp8")
SCALE_SHAPES = ("token", "keepdim", "group")
SCALE_DECODES = ("raw", "cast", "e8m0", "f32_bytes")
EX_P, EX_B, EX_D, EX_G, EX_N = 7, 4, 32, 4, 5  # example sizes for tracing (all distinct)


@dataclasses.dataclass(frozen=True)
class Form:
    values: str
    n_idx: int
    scale_shape: str
    scale_decode: str

    @property
    def name(self):
        return f"{self.values}:idx{self.n_idx}:{self.scale_shape}:{self.scale_decode}"

    @property
    def argnames(self):
        return ("values", "index0", "index1", "scales") if self.n_idx == 2 else ("values", "index0", "scales")


def _gather(t, idx):
    return t[idx]


def _decode_values(form: Form, values, idx):
    if form.values == "u8_before":
        q = _gather(values.view(torch.float8_e4m3fn), idx)
    elif form.values == "u8_after":
        q = _gather(values, idx).view(torch.float8_e4m3fn)
    else:
        q = _gather(values, idx)
    return q.float()


def _decode_scales(form: Form, scales, idx):
    s = _gather(scales, idx)
    if form.scale_decode == "cast":
        s = s.float()
    elif form.scale_decode == "e8m0":
        s = s.view(_E8M0).float()
    elif form.scale_decode == "f32_bytes":
        s = s.view(torch.float32)
    return s


def _scaled(form: Form, x, s, group):
    if form.scale_shape == "token":
        return x * s.unsqueeze(-1)
    if form.scale_shape == "keepdim":
        return x * s
    # ``group`` (the elements per scale) is a literal in model code: captured, and checked against D / G
    return (x.unflatten(-1, (s.shape[-1], group)) * s.unsqueeze(-1)).flatten(-2)


def _scale_arg(form: Form, scales):
    """The op's ``scales`` (rank of ``values``, groups last) from the pattern's scale table."""
    if form.scale_decode == "f32_bytes":  # the table's bytes as fp32 (``_check`` proved the view is legal)
        return scales.view(torch.float32)
    return scales.unsqueeze(-1) if form.scale_shape == "token" else scales


GROUP_MAGIC = 37  # stands for the group size (elements per block scale) while tracing


def _make_variant(form: Form) -> Variant:
    grouped = form.scale_shape == "group"
    argnames = form.argnames + (("group",) if grouped else ())

    def split(args):
        group = args[-1] if grouped else None
        args = args[:-1] if grouped else args
        if form.n_idx == 2:
            values, i0, i1, scales = args
            return values, (i0, i1), scales, group
        values, i0, scales = args
        return values, (i0,), scales, group

    def search(*args):
        values, idx, scales, group = split(args)
        return _scaled(form, _decode_values(form, values, idx), _decode_scales(form, scales, idx), group)

    def replace(*args):
        values, idx, scales, _ = split(args)
        i1 = idx[1] if form.n_idx == 2 else None
        return torch.ops.dsa_inductor.gather_dequant(values, _scale_arg(form, scales), idx[0], i1, 0, None, False,
                                                     "e4m3", torch.float32)

    def example_inputs():
        vdt = torch.float8_e4m3fn if form.values == "fp8" else torch.uint8
        d = EX_G * GROUP_MAGIC if grouped else EX_D
        vshape = (EX_P, EX_B, d) if form.n_idx == 2 else (EX_P, d)
        lead = vshape[:-1]
        sshape = {"token": lead, "keepdim": (*lead, 1), "group": (*lead, EX_G)}[form.scale_shape]
        sdt = {"raw": torch.float32, "cast": torch.bfloat16, "e8m0": torch.uint8,
               "f32_bytes": torch.uint8}[form.scale_decode]
        if form.scale_decode == "f32_bytes":
            sshape = (*sshape[:-1], 4 * sshape[-1])
        idx = [torch.empty(EX_N, dtype=torch.int64) for _ in range(form.n_idx)]
        return [torch.empty(vshape, dtype=vdt), *idx, torch.empty(sshape, dtype=sdt)] + (
            [GROUP_MAGIC] if grouped else [])

    workaround = {"group": GROUP_MAGIC} if grouped else {}
    return Variant(form.name, argnames, search, replace, example_inputs, workaround,
                   check=lambda m: _check(form, m), compare=exact_compare)


def _static_eq(a, b) -> bool:
    return statically_known_true(a == b)


def _group_of_product(match, g, d) -> Optional[int]:
    """The block size read off the matched ``[..., G, group] * [..., G, 1]`` product, where the pattern's
    literal was not captured (torch 2.11's pattern matcher ignores ints inside the reshape's size list)."""
    for node in match.nodes:
        val = node.meta.get("val") if node.target is aten.mul.Tensor else None
        if isinstance(val, torch.Tensor) and val.dim() >= 2 and _static_eq(val.shape[-2], g) and \
                _static_eq(val.shape[-2] * val.shape[-1], d) and isinstance(val.shape[-1], int):
            return val.shape[-1]
    return None


def _check(form: Form, match) -> Optional[str]:
    values = tensor_meta(match, "values")
    scales = tensor_meta(match, "scales")
    if values is None or scales is None:
        return "values or scales are not tensors"
    want = torch.float8_e4m3fn if form.values == "fp8" else torch.uint8
    if values.dtype != want:
        return f"the cache has dtype {values.dtype}, expected {want}"
    if values.dim() not in ((3,) if form.n_idx == 2 else (2, 3)):
        return f"the cache has rank {values.dim()}, expected [P, D] or [P, B, D] for this addressing"
    for name in ("index0", "index1")[: form.n_idx]:
        t = tensor_meta(match, name)
        if t is None or t.dtype not in _INT:
            return f"{name} is not an int32/int64 tensor ({getattr(t, 'dtype', None)}): a mask index gathers otherwise"
    if form.scale_decode in ("e8m0", "f32_bytes") and scales.dtype != torch.uint8:
        kind = "UE8M0" if form.scale_decode == "e8m0" else "byte-stored fp32"
        return f"{kind} scales have dtype {scales.dtype}, expected uint8"
    if form.scale_decode in ("raw", "cast") and scales.dtype not in _FLOAT_SCALES:
        return f"scales have dtype {scales.dtype}, expected float32/bfloat16/float16"
    if form.scale_decode == "f32_bytes":
        why = _fp32_view_refusal(scales)
        if why is not None:
            return why
        scales = scales.view(torch.float32)
    sc_shape = (*scales.shape, 1) if form.scale_shape == "token" else tuple(scales.shape)
    if len(sc_shape) != values.dim():
        return (f"the scale table {tuple(scales.shape)} does not hold one scale row per cache row "
                f"{tuple(values.shape[:-1])}: it broadcasts along another dim")
    for i in range(form.n_idx, values.dim() - 1):  # indexed dims may differ in size, as in eager
        if not (_static_eq(sc_shape[i], values.shape[i]) or _static_eq(sc_shape[i], 1)):
            return f"scale table dim {i} ({sc_shape[i]}) does not match the cache ({values.shape[i]})"
    d, g = values.shape[-1], sc_shape[-1]
    if not statically_known_true(d % g == 0):
        return f"{g} scale groups do not divide D = {d}"
    group = match.kwargs.get("group")
    if form.scale_shape == "group" and not isinstance(group, int):
        group = _group_of_product(match, g, d)
    if form.scale_shape == "group" and not (isinstance(group, int) and statically_known_true(group * g == d)):
        return f"blocks of {group} elements x {g} scales do not cover D = {d}"
    out = match.output_nodes()[0].meta.get("val")
    gathered = _gathered_shape(match, values, form)
    if out is None or gathered is None or len(out.shape) != len(gathered) or not all(
            _static_eq(a, b) for a, b in zip(out.shape, gathered)):
        return (f"the product has shape {tuple(getattr(out, 'shape', ()))}, not the gathered rows' "
                f"{gathered}: the scale varies along another dim")
    if out.dtype != torch.float32:
        return f"the product has dtype {out.dtype}, expected float32"
    return None


def _fp32_view_refusal(scales) -> Optional[str]:
    """Why the uint8 scale table cannot be viewed as float32 as a whole (eager views each gathered row,
    a contiguous copy), or None: the bytes of a scale must be the last dim's, 4-aligned."""
    if not (_static_eq(scales.stride(-1), 1) and statically_known_true(scales.shape[-1] % 4 == 0)):
        return "the fp32 scale bytes are not contiguous groups of 4 in the last dim"
    if not all(statically_known_true(st % 4 == 0) for st in scales.stride()[:-1]) or \
            not statically_known_true(scales.storage_offset() % 4 == 0):
        return "the fp32 scale bytes are not 4-byte aligned in the cache (strides or offset)"
    return None


def _gathered_shape(match, values, form):
    idx = [tensor_meta(match, n) for n in ("index0", "index1")[: form.n_idx]]
    if any(t is None for t in idx):
        return None
    tok = torch.broadcast_shapes(*[t.shape for t in idx])
    return (*tok, *values.shape[form.n_idx:])


# ---- graph helpers ------------------------------------------------------------------------------------------

def _val(n):
    return n.meta.get("val") if isinstance(n, torch.fx.Node) else None


def _is_fp8_float(node) -> bool:
    """Is ``node`` ``convert_element_type(<float8_e4m3fn tensor>, float32)`` (possibly reshaped)?"""
    for _ in range(2):
        if isinstance(node, torch.fx.Node) and node.target is aten.reshape.default:
            node = node.args[0]
    if not (isinstance(node, torch.fx.Node) and node.target is prims.convert_element_type.default):
        return False
    src = _val(node.args[0])
    return isinstance(src, torch.Tensor) and src.dtype == torch.float8_e4m3fn


def _is_op(node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.dsa_inductor.gather_dequant.default


_ARGS = ("values", "scales", "index0", "index1", "block_size", "drop", "zero_negative", "fmt", "out_dtype",
         "scale_bytes")


def _op_args(node) -> dict:
    return {"scale_bytes": False, **dict(zip(_ARGS, node.args))}


def takes_scale_bytes(node) -> bool:
    """Does the ``gather_dequant`` node take its scales as fp32 bytes (``scale_bytes``, ``_fold_scale_bytes``)?"""
    return bool(_op_args(node)["scale_bytes"])


def _fake_mode(vals):
    for v in torch.utils._pytree.tree_leaves(vals):
        if isinstance(v, torch.Tensor):
            return v.fake_mode
    raise RuntimeError("no tensor argument")


def _replace_op(graph, node, replaced_user=None, **changes):
    """A new op node with ``changes`` applied, taking the uses of ``replaced_user`` (default: ``node``)."""
    kw = _op_args(node)
    kw.update(changes)
    args = tuple(kw[a] for a in _ARGS)
    target = replaced_user if replaced_user is not None else node
    new = _new_node(graph, target, node.target, args)
    target.replace_all_uses_with(new)
    graph.erase_node(target)
    if target is not node and not node.users:
        graph.erase_node(node)
    return new


def _new_node(graph, before, target, args):
    vals = torch.fx.node.map_arg(args, _val)
    with graph.inserting_before(before), _fake_mode(vals):
        new = graph.call_function(target, args)
        new.meta["val"] = target(*vals)
    return new


def slot_of_page_pos(i0, i1):
    """``(x, B)`` when ``i0 = x // B`` (floor) and ``i1 = x % B`` of one int tensor ``x`` and an int ``B > 0``,
    else None: (page, position) indices that are a slot's."""
    if not (isinstance(i0, torch.fx.Node) and isinstance(i1, torch.fx.Node)):
        return None
    if not (i0.target is aten.div.Tensor_mode and i0.kwargs.get("rounding_mode") == "floor"
            and i1.target is aten.remainder.Scalar):
        return None
    x, c = i0.args[0], i0.args[1]
    if i1.args[0] is not x or i1.args[1] != c or not isinstance(c, int) or c <= 0:
        return None
    if _val(x) is None or _val(x).dtype not in _INT:
        return None
    return x, c


def _fold_slot_index(graph, node) -> Optional[str]:
    """index0 = x // B, index1 = x % B with B the page size -> slot addressing."""
    a = _op_args(node)
    found = slot_of_page_pos(a["index0"], a["index1"])
    if found is None or not _static_eq(_val(a["values"]).shape[1], found[1]):
        return None
    x, c = found
    _replace_op(graph, node, index0=x, index1=None, block_size=c)
    return "index0 = slot // B, index1 = slot % B -> slot addressing in the kernel (no index kernel)"


_FULL = aten.full.default


def is_zero_full(node) -> bool:
    """A ``full`` of +0: a scalar, or a zeros tensor (the lifted loops' output buffer, ``out[i]`` never
    written); the caller checks that the ``where`` keeps the op's shape and dtype, so it does not broadcast."""
    if not (isinstance(node, torch.fx.Node) and node.target is _FULL):
        return False
    v = node.args[1]
    return isinstance(v, (int, float)) and v == 0 and math.copysign(1.0, v) > 0


_CMP = (aten.lt.Scalar, aten.ge.Scalar, aten.le.Scalar, aten.gt.Scalar, aten.eq.Scalar, aten.ne.Scalar)


def _token_mask(graph, cond, extra: int, before):
    """A node holding ``cond`` without its ``extra`` trailing size-1 broadcast dims, or None.

    Takes ``unsqueeze(c, last)`` repeated, ``reshape(c, [*c.shape, 1, ...])``, or a scalar comparison of
    such an unsqueeze (rebuilt on ``c``).
    """
    node = cond
    if isinstance(node, torch.fx.Node) and node.target is aten.reshape.default and extra > 0:
        inner, shape = _val(node.args[0]), list(node.args[1])
        if inner is not None and len(shape) == inner.dim() + extra and all(
                _static_eq(a, b) for a, b in zip(shape, inner.shape)) and all(
                _static_eq(x, 1) for x in shape[inner.dim():]):
            return node.args[0]
    for _ in range(extra):
        if isinstance(node, torch.fx.Node) and node.target is aten.unsqueeze.default:
            inner = _val(node.args[0])
            if inner is None or node.args[1] != inner.dim():
                return None
            node = node.args[0]
        else:
            node = None
            break
    if node is not None:
        return node
    if isinstance(cond, torch.fx.Node) and cond.target in _CMP and isinstance(cond.args[1], (int, float)):
        inner = _token_mask(graph, cond.args[0], extra, before)
        if inner is not None and _val(inner) is not None:
            return _new_node(graph, before, cond.target, (inner, cond.args[1]))
    return None


def _fold_zero_mask(graph, node) -> Optional[str]:
    """``where(mask, 0, op)`` / ``where(keep, op, 0)`` with a per-token mask -> ``drop`` / ``zero_negative``."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if user.target is not aten.where.self:
        return None
    cond, a, b = user.args
    if b is node and is_zero_full(a):
        keeps = False
    elif a is node and is_zero_full(b):
        keeps = True
    else:
        return None
    out, res = _val(node), _val(user)
    if out is None or res is None or res.dtype != out.dtype or len(res.shape) != len(out.shape) or not all(
            _static_eq(x, y) for x, y in zip(res.shape, out.shape)):
        return None
    args = _op_args(node)
    tok_rank = out.dim() - 1 - (1 if (args["index1"] is None and args["block_size"] == 0
                                      and _val(args["values"]).dim() == 3) else 0)
    cval = _val(cond)
    if cval is None or cval.dtype != torch.bool or cval.dim() != out.dim():
        return None
    mask = _token_mask(graph, cond, out.dim() - tok_rank, user)
    if mask is None or _val(mask).dim() > tok_rank:
        return None
    # A negative-slot test on the index itself (or on what was clamped into it): zero_negative.
    neg_test = (aten.ge.Scalar if keeps else aten.lt.Scalar)
    i0 = args["index0"]
    if (mask.target is neg_test and mask.args[1] == 0 and args["drop"] is None and not args["zero_negative"]
            and (args["index1"] is None)):
        x = mask.args[0]
        clamp_of_x = (isinstance(i0, torch.fx.Node) and i0.target is aten.clamp_min.default and i0.args[0] is x
                      and i0.args[1] == 0)
        if x is i0 or clamp_of_x:
            _replace_op(graph, node, replaced_user=user, index0=x, zero_negative=True)
            return "where(slot < 0, 0, k) -> zero_negative on the raw slots (no mask, no clamp)"
    if keeps:
        mask = _new_node(graph, user, aten.bitwise_not.default, (mask,))
    if args["drop"] is not None:
        mask = _new_node(graph, user, aten.bitwise_or.Tensor, (args["drop"], mask))
    _replace_op(graph, node, replaced_user=user, drop=mask)
    return "where(mask, 0, k) -> drop in the kernel (no zeroing pass)"


def _fold_cast(graph, node) -> Optional[str]:
    """A single ``.to(bfloat16 / float16)`` of the fp32 result -> ``out_dtype``."""
    if len(node.users) != 1 or node.args[8] != torch.float32:
        return None
    user = next(iter(node.users))
    if user.target is not prims.convert_element_type.default or user.args[1] not in (torch.bfloat16, torch.float16):
        return None
    dt = user.args[1]
    _replace_op(graph, node, replaced_user=user, out_dtype=dt)
    return f".to({dt}) -> out_dtype (one rounding of the same fp32 product)"


def _fold_scale_bytes(graph, node) -> Optional[str]:
    """Scales that are ``view(torch.float32)`` of uint8 bytes (the inline page layout: ``pages[:, B * D:]``) ->
    those bytes with ``scale_bytes``: the op takes the fp32 view of the strided bytes itself, where Inductor
    would copy the whole byte table to take it in the graph.  Token scales (``[P, B]`` viewed from ``[P, 4 B]``
    bytes, unsqueezed to ``[P, B, 1]``) are passed as ``[P, B, 4]`` bytes."""
    a = _op_args(node)
    s = a["scales"]
    if a["scale_bytes"] or not isinstance(s, torch.fx.Node):
        return None
    token = s.target is aten.unsqueeze.default
    v = s.args[0] if token else s
    if not (isinstance(v, torch.fx.Node) and v.target is aten.view.dtype and v.args[1] == torch.float32):
        return None
    u = v.args[0]
    uv, vv = _val(u), _val(v)
    if uv is None or vv is None or uv.dtype != torch.uint8:
        return None
    if token:
        if not (s.args[1] in (-1, vv.dim()) and uv.dim() == 2 and isinstance(uv.shape[1], int)):
            return None
        u = _new_node(graph, node, aten.reshape.default, (u, [-1, uv.shape[1] // 4, 4]))
    _replace_op(graph, node, scales=u, scale_bytes=True)
    return "scales.view(float32) of the cache's bytes -> viewed by the op (no copy of the scale table)"


FOLDS = (_fold_slot_index, _fold_zero_mask, _fold_cast, _fold_scale_bytes)


def fold_into_ops(graph: torch.fx.Graph, stats) -> int:
    """Apply the follow-up rewrites until none applies; returns how many were made."""
    done = 0
    changed = True
    while changed:
        changed = False
        for node in list(graph.nodes):
            if node.graph is None or not _is_op(node):
                continue
            for fold in FOLDS:
                note = fold(graph, node)
                if note is not None:
                    stats.notes[note] += 1
                    done += 1
                    changed = True
                    break
            if changed:
                break
    if done:
        graph.eliminate_dead_code()
    return done


class GatherDequantRule(Rule):
    name = "gather_dequant"
    op = "dsa_inductor::gather_dequant"
    anchors = (aten.mul.Tensor,)

    def variants(self):
        for values, n_idx, shape, decode in itertools.product(VALUE_FORMS, (1, 2), SCALE_SHAPES, SCALE_DECODES):
            if decode == "e8m0" and _E8M0 is None or decode == "f32_bytes" and shape == "token":
                continue
            yield _make_variant(Form(values, n_idx, shape, decode))

    def candidates(self, graph: torch.fx.Graph) -> list:
        """Multiplies with an FP8 -> float operand: the only muls this rule could rewrite."""
        return [n for n in graph.nodes if n.op == "call_function" and n.target is aten.mul.Tensor
                and any(_is_fp8_float(a) for a in n.args[:2])]

    def apply(self, graph: torch.fx.Graph) -> int:
        for n in self.candidates(graph):  # a * b == b * a exactly: the FP8 operand first, as the variants have it
            if not _is_fp8_float(n.args[0]):
                n.args = (n.args[1], n.args[0], *n.args[2:])
        matched = super().apply(graph)
        if matched:
            fold_into_ops(graph, stats_for(self.name, self.op))
        return matched

    def diagnose(self, node: torch.fx.Node) -> str:
        q, s = node.args[:2]
        conv = q
        while conv.target is aten.reshape.default:
            conv = conv.args[0]
        if conv.args[1] != torch.float32:
            return f"the FP8 values are converted to {conv.args[1]}, not float32"
        src = conv.args[0]
        if src.target is aten.view.dtype:
            src = src.args[0]
        if src.target is not aten.index.Tensor:
            return "the FP8 values are not gathered by index (no cache[idx] / index_select before the upcast)"
        idx = [i for i in src.args[1]]
        found = _find_index(s)
        if found is None:
            return "the scale is not gathered from a table (a per-channel or global scale is not this idiom)"
        if list(found.args[1]) != idx:
            return "the scale is gathered with other indices than the values"
        return "the scale's shape or dtype matches no variant (e.g. it varies along another dim than D's groups)"


def _find_index(node, depth=0):
    if not isinstance(node, torch.fx.Node) or depth > 4:
        return None
    if node.target is aten.index.Tensor:
        return node
    if node.target in (aten.unsqueeze.default, prims.convert_element_type.default, aten.view.dtype,
                       aten.reshape.default, aten.expand.default):
        return _find_index(node.args[0], depth + 1)
    return None
