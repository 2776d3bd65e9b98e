"""Helpers called by the vectorized code that :mod:`dsa_inductor.loops.analyze` generates.

Conventions: a *batched* value has a leading dimension of length N (the loop's trip count) in front of
the per-iteration shape; an *invariant* value is whatever the original code had (tensor, int, dtype...).
Batched Python ints (elements of ``t.tolist()``, loop indices) are int64 tensors of shape [N].

Every helper either computes exactly what the loop computed for each iteration, or raises
:class:`Unsupported` while tracing (dtypes and ranks are static under Dynamo), in which case the lifted
function falls back to (a clone of) the original loop.
"""

from __future__ import annotations

import operator

import torch


class Unsupported(Exception):
    """A runtime property (dtype, rank, type of an operand) the lifted form does not cover."""


_BINOPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv,
           "//": operator.floordiv, "%": operator.mod, "**": operator.pow}
_INT_OPS = ("+", "-", "*", "//", "%")
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def is_int(x) -> bool:
    return isinstance(x, (int, torch.SymInt))


def check_int(x):
    """An invariant operand of batched int arithmetic must be a Python int (or SymInt)."""
    if not is_int(x):
        raise Unsupported(f"expected a Python int, got {type(x).__name__}")
    return x


def ints_of_list(t):
    """``t.tolist()`` of a 1-D integer tensor, as an int64 batched value [N]; else Unsupported."""
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype not in _INT_DTYPES:
        raise Unsupported("tolist() of something other than a 1-D integer tensor")
    return t.to(torch.int64)


def int_of_tensor(b):
    """``int(x)`` / ``x.item()`` of a batched tensor whose items are 0-d integer tensors."""
    if b.dim() != 1 or b.dtype not in _INT_DTYPES + (torch.bool,):
        raise Unsupported("int()/item() of a non-integer or non-scalar item")
    return b.to(torch.int64)


def arange_like(n, ref):
    return torch.arange(n, device=ref.device if isinstance(ref, torch.Tensor) else None, dtype=torch.int64)


def int_binop(op: str, a, b):
    """Batched-int arithmetic with Python semantics (floor division and modulo follow the divisor's sign)."""
    if op not in _INT_OPS:
        raise Unsupported(f"operator {op} on loop ints")
    if not isinstance(a, torch.Tensor):
        check_int(a)
    if not isinstance(b, torch.Tensor):
        check_int(b)
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.device != b.device:
        b = b.to(a.device)
    return _BINOPS[op](a, b)


def int_cmp(op: str, a, b):
    if not isinstance(a, torch.Tensor):
        check_int(a)
    if not isinstance(b, torch.Tensor):
        check_int(b)
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.device != b.device:
        b = b.to(a.device)
    return {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
            "==": operator.eq, "!=": operator.ne}[op](a, b)


def keep(valid, cond):
    """Rows still live after ``if cond: continue``."""
    return valid & ~cond.to(valid.device)


def _unsqueeze_items(x, rank: int):
    """View batched ``x`` [N, *S] as [N, 1, ..., 1, *S] with ``rank`` item dims."""
    extra = rank - (x.dim() - 1)
    if extra <= 0:
        return x
    return x.reshape((x.shape[0],) + (1,) * extra + tuple(x.shape[1:]))


def tensor_binop(op: str, a, a_batched: bool, b, b_batched: bool):
    """Elementwise op where at least one side is a batched tensor.

    Per-item broadcasting is right-aligned, so the batched sides get singleton dims after the batch dim
    until their item rank matches the other side's.  Type promotion of two tensors depends on whether one
    is 0-d, and every batched tensor has a dimension more than its items, so mixed dtypes with a 0-d item
    are refused."""
    if op not in _BINOPS:
        raise Unsupported(f"operator {op}")
    ta, tb = isinstance(a, torch.Tensor), isinstance(b, torch.Tensor)
    if ta and tb:
        ra = a.dim() - 1 if a_batched else a.dim()
        rb = b.dim() - 1 if b_batched else b.dim()
        if a.dtype != b.dtype and (ra == 0 or rb == 0):
            raise Unsupported("mixed dtypes with a 0-d item: promotion would differ")
        r = max(ra, rb)
        if a_batched:
            a = _unsqueeze_items(a, r)
        if b_batched:
            b = _unsqueeze_items(b, r)
        if a_batched and not b_batched and b.device != a.device and b.dim() > 0:
            raise Unsupported("operands on different devices")
    elif not (isinstance(a, (int, float, bool)) or isinstance(b, (int, float, bool))):
        raise Unsupported("operand that is neither a tensor nor a Python number")
    return _BINOPS[op](a, b)


def gather(t, valid, specs):
    """Per-row ``t[spec_0, spec_1, ...]`` for the live rows, as one advanced-indexing gather.

    ``specs`` items: ``("int", k)`` an invariant int; ``("idx", v)`` a batched int [N] (from
    :func:`live_index`: dead rows hold 0, as in ``tile``); ``("slice", lo, w)`` a batched start [N] with an
    invariant width ``w`` (the analysis proved ``hi - lo == w``); ``("tile", s, c, w, m)`` the slice
    ``[c + s*w : c + (s+1)*w]`` with ``s = x % m`` (see :func:`_gather_tile`); ``("full",)`` a whole
    dimension.  Dead rows read index 0 (their values are never used).  Slices must lie inside the
    dimension for live rows, where Python would clamp them: checked with ``torch._assert_async``.
    Returns [N, *item_shape]."""
    if not isinstance(t, torch.Tensor):
        raise Unsupported("indexing something other than a tensor")
    n = valid.shape[0]
    valid = valid.to(t.device)
    tiled = _gather_tile(t, valid, specs)
    if tiled is not None:
        return tiled
    specs = [("slice", _tile_start(s), s[3]) if s[0] == "tile" else s for s in specs]
    nitem = sum(1 for s in specs if s[0] in ("slice", "full"))
    index, k = [], 0
    for dim, spec in enumerate(specs):
        if spec[0] == "int":
            index.append(check_int(spec[1]))
        elif spec[0] == "idx":
            index.append(spec[1].to(t.device).reshape((n,) + (1,) * nitem))
        else:
            if spec[0] == "full":
                lo, w = torch.zeros((n,), dtype=torch.int64, device=t.device), t.shape[dim]
            else:
                lo, w = spec[1].to(t.device), spec[2]
                torch._check(w >= 0)
                ok = (lo >= 0) & (lo + w <= t.shape[dim])
                torch._assert_async(torch.all(ok | ~valid), "dsa_inductor lifted loop: slice out of range")
                lo = torch.where(valid, lo, 0)
            ar = torch.arange(w, device=t.device, dtype=torch.int64)
            shape_ar = [1] * (nitem + 1)
            shape_ar[1 + k] = w
            shape_lo = [n] + [1] * nitem
            index.append(lo.reshape(shape_lo) + ar.reshape(shape_ar))
            k += 1
    out = t[tuple(index)]
    if not any(s[0] in ("idx", "slice", "full") for s in specs):
        raise Unsupported("gather without a batched index")
    return out


def live_index(valid, v):
    """Batched int ``v`` [N] with the dead rows (``~valid``) set to 0, so that they read a valid row."""
    return torch.where(valid.to(v.device), v, 0)


def _tile_start(spec):
    _, s, c, w, _ = spec
    return s * w + c


def _gather_tile(t, valid, specs):
    """Rows ``t[i_0, ..., i_j, c + s*w : c + (s+1)*w, :, ...]`` as ``view[i_0, ..., i_j, s]`` of the tile view
    ``t.narrow(d, c, M*w).unflatten(d, (M, w))``, ``M = (L - c) // w``; None where that does not apply
    (then the slice is gathered column by column).

    Applies to one ``tile`` spec with only ``int`` / ``idx`` specs before it and ``full`` after, ``w > 0``,
    ``0 <= c <= L - w``, and a divisor ``m > 0``, so ``s = x % m`` is in ``[0, m)`` as Python computes it.
    For live rows the original slice lies inside the dimension (checked, as the column form checks it)
    exactly when ``s < M``; dead rows read tile 0 (``s`` comes from :func:`live_index`)."""
    kinds = [sp[0] for sp in specs]
    if kinds.count("tile") != 1:
        return None
    d = kinds.index("tile")
    if any(k not in ("int", "idx") for k in kinds[:d]) or any(k != "full" for k in kinds[d + 1:]):
        return None
    _, s, c, w, m = specs[d]
    if not all(is_int(x) for x in (c, w, m)):
        return None
    size = t.shape[d]
    if not (m > 0 and w > 0 and 0 <= c and c + w <= size):
        return None
    tiles = (size - c) // w
    view = t.narrow(d, c, tiles * w).unflatten(d, (tiles, w))
    s = s.to(t.device)
    torch._assert_async(torch.all((s < tiles) | ~valid), "dsa_inductor lifted loop: slice out of range")
    index = [check_int(sp[1]) if sp[0] == "int" else sp[1].to(t.device) for sp in specs[:d]]
    return view[tuple(index) + (s,)]


def item_index(x, idx):
    """Per-item basic indexing ``item[idx]`` of batched ``x`` (idx invariant): ``x[:, idx]``."""
    if not isinstance(idx, tuple):
        idx = (idx,)
    for e in idx:
        if e is None or e is Ellipsis or isinstance(e, torch.Tensor):
            raise Unsupported("None/Ellipsis/tensor index on a loop item")
    return x[(slice(None),) + idx]


def view_dtype(x, dtype):
    if not isinstance(dtype, torch.dtype):
        raise Unsupported(".view() with a shape")
    if x.dim() == 1 and dtype.itemsize != x.dtype.itemsize:
        raise Unsupported(".view(dtype) of 0-d items with another element size")
    return x.view(dtype)


def to_dtype(x, dtype):
    if not isinstance(dtype, torch.dtype):
        raise Unsupported(".to() with something other than a dtype")
    return x.to(dtype)


def write_rows(out, valid, value, value_batched: bool):
    """``out[i] = value`` for every live row i in [0, N)."""
    if not isinstance(out, torch.Tensor):
        raise Unsupported("writing rows of something other than a tensor")
    n = valid.shape[0]
    cur = out[:n]
    if value_batched:
        if not isinstance(value, torch.Tensor):
            raise Unsupported("batched non-tensor value")
        value = _unsqueeze_items(value.to(out.device), cur.dim() - 1)
        if value.dim() - 1 > cur.dim() - 1:
            raise Unsupported("value has more dims than out[i]")
        value = value.to(out.dtype)
    else:
        value = torch.as_tensor(value, dtype=out.dtype, device=out.device) if not isinstance(value, torch.Tensor) \
            else value.to(device=out.device, dtype=out.dtype)
    mask = valid.to(out.device).reshape((n,) + (1,) * (cur.dim() - 1))
    out[:n] = torch.where(mask, value, cur)


@torch.library.custom_op("dsa_inductor::ragged_rows", mutates_args=())
def ragged_rows(reps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expand per-request repeat counts into per-element (row id, position within the row).

    Args:
        reps: int64 ``[B]`` elements per row; negative counts are taken as 0 (``range(n)`` of a negative n).

    Returns:
        ``(rid, pos)``: int64 ``[T]`` each, on ``reps``' device, ``T = sum(max(reps, 0))``; element ``e`` is
        position ``pos[e]`` of row ``rid[e]``, rows in order (``torch.repeat_interleave`` semantics).

    T depends on the values of ``reps``: the fake implementation gives it an unbacked size, so Dynamo
    traces this op into the graph without ``capture_scalar_outputs`` / ``capture_dynamic_output_shape_ops``
    (the op itself, not Dynamo, reads the sizes; Inductor calls it as an extern kernel).
    """
    if reps.dim() != 1 or reps.dtype != torch.int64:
        raise ValueError(f"ragged_rows: `reps` must be a 1-D int64 tensor, got {tuple(reps.shape)} {reps.dtype}")
    reps = reps.clamp(min=0)
    rid = torch.repeat_interleave(torch.arange(reps.shape[0], device=reps.device), reps)
    starts = torch.cumsum(reps, 0) - reps
    return rid, torch.arange(rid.shape[0], device=reps.device, dtype=torch.int64) - starts[rid]


@ragged_rows.register_fake
def _(reps):
    ctx = torch.library.get_ctx()
    try:  # allowed when the user enabled capture_dynamic_output_shape_ops or fullgraph=True
        total = ctx.new_dynamic_size()
    except torch._subclasses.fake_tensor.DynamicOutputShapeException:
        # Otherwise Dynamo would graph-break here and run the *original* loop (its frame is then traced as
        # stock torch.compile does: a recompile per batch).  The size is ours to allocate: an unbacked
        # symbol that the op's real output binds at run time, as ``new_dynamic_size`` would.
        total = ctx._shape_env.create_unbacked_symint()
        torch._check(total >= 0)
    return reps.new_empty((total,), dtype=torch.int64), reps.new_empty((total,), dtype=torch.int64)


def ragged(reps):
    """Row id per emitted element and position within its row, for ``for t in range(reps[b])``.

    Returns ``(rid [T], t [T])`` with T = sum(max(reps, 0)), through :func:`ragged_rows` (one graph, no
    Dynamo config needed: T is an unbacked size)."""
    return ragged_rows(reps.to(torch.int64))


def exclusive_cumsum(x, init):
    return torch.cumsum(x, 0) - x + init


def ints_to_tensor(v, dtype=None, device=None):
    """``torch.tensor(list_of_ints, dtype=..., device=...)`` of the int64 values ``v``."""
    if dtype is None:
        raise Unsupported("torch.tensor() of the list without dtype (an empty list would be float32)")
    return v.to(device=device if device is not None else torch.empty(0).device, dtype=dtype)


# Read by every polyfill while Dynamo traces it (a guarded global): False after unregister_dsa_passes(),
# so a polyfill that could not be removed from Dynamo's tables traces the original loop.
ENABLED = True
VERIFY = False  # register_dsa_passes(verify=True): run the original beside the lifted code (lift.loop_verify)
