"""``dsa_inductor::windowed_softmax``: softmax over a per-row window ``[row_starts, row_ends)``.

Idiom (DSA prefill attention masks, DeepSeek-V4 sliding-window attention over the last 128 keys,
transformers' causal masks built from ``arange`` comparisons)::

    pos = torch.arange(T); keep = (pos >= ks[:, None]) & (pos < ke[:, None])    # or kv <= q, a window
    probs = scores.masked_fill(~keep, float("-inf")).softmax(dim=-1)            # or where(...), .float()

Semantics: ``torch.softmax(where(keep, scores, -inf), dim=-1, dtype=out_dtype)`` broadcast to
``(*batch, N)``, where ``keep`` is the conjunction of

* ``row_starts[..., None] <= arange(N) < row_ends[..., None]`` (either bound optional);
* ``mask`` (optional bool, True keeps).  The rule passes a mask only when it is an arange comparison,
  and its follow-up pass then turns it into bounds; the op takes any bool mask all the same.

As for ``softmax(x, dtype=out_dtype)``, the scores are first rounded to ``out_dtype`` (exact for an
upcast), the softmax is computed in fp32, and the result is rounded to ``out_dtype`` once.

Positions outside the window are exactly 0.  Non-finite cases are those of eager, row by row: a row
with no kept position, or whose kept scores are all ``-inf``, is NaN in every position (eager's
``amax`` is ``-inf`` and ``-inf - -inf`` is NaN); a kept NaN or ``+inf`` makes the whole row NaN,
masked positions included (eager's sum is NaN).  Scores outside the window are never read, so a NaN
there does not matter (``masked_fill`` replaced it in eager too).

CUDA path (``windowed_softmax_triton``): one Triton program per row.  Pass 1 reads only the window,
in tiles of ``BLOCK`` starting at ``row_starts``, keeping an online max and sum (fp32).  Pass 2 walks
the whole row in aligned tiles: a tile that meets the window re-reads its part of the window and
writes ``exp(x - max) / sum``; every other tile only stores zeros.  The output is dense like eager's,
so the zero stores are most of the traffic: a 128-wide window over 8192 x 8192 fp32 reads 4 MiB but
must write 256 MiB (80 us at 3.35 TB/s on an H100).

CPU path: plain torch (what eager computes); the compiled graph calls the op as an extern kernel, so
these torch ops run eagerly inside it (Inductor does not trace into the op).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..testing import softmax_mismatch  # noqa: F401  (the equivalence contract; re-exported)
from .host import broadcast_shapes, by_metadata
from .registry import fused_op

try:  # triton is optional on CPU-only installs; the CPU path never needs it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None

OP_NAME = "dsa_inductor::windowed_softmax"
VERIFY = False  # set by register_dsa_passes(verify=True): check each CUDA call against eager
BLOCK = 1024  # positions per tile (window tiles in pass 1, row tiles in pass 2)
NUM_WARPS = 4
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check_args(scores, row_starts, row_ends, mask, out_dtype):
    """Raise ValueError/TypeError naming the offending argument."""
    if not isinstance(scores, torch.Tensor) or scores.dim() < 1:
        raise ValueError("windowed_softmax: `scores` must be a tensor with at least 1 dimension")
    if scores.dtype not in _FLOATS:
        raise TypeError(f"windowed_softmax: `scores` must be float32, float16 or bfloat16, got {scores.dtype}")
    for name, t in (("row_starts", row_starts), ("row_ends", row_ends)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"windowed_softmax: `{name}` must be an int32 or int64 tensor, got "
                            f"{getattr(t, 'dtype', type(t))}")
        if t.device != scores.device:
            raise ValueError(f"windowed_softmax: `{name}` is on {t.device}, `scores` on {scores.device}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"windowed_softmax: `mask` must be a bool tensor, got {getattr(mask, 'dtype', mask)}")
        if mask.device != scores.device or mask.dim() < 1:
            raise ValueError("windowed_softmax: `mask` must be a >=1-d bool tensor on the device of `scores`")
    if out_dtype not in _FLOATS:
        raise TypeError(f"windowed_softmax: `out_dtype` must be torch.float32, float16 or bfloat16, got {out_dtype}")
    n = scores.shape[-1]
    if mask is not None and _known_differ(mask.shape[-1], n) and _known_differ(mask.shape[-1], 1):
        raise ValueError(f"windowed_softmax: `mask` has last dim {mask.shape[-1]}, `scores` has {n} (or 1 to "
                         "broadcast)")
    shape = tuple(scores.shape[:-1])
    for name, own in (("row_starts", row_starts), ("row_ends", row_ends), ("mask", mask)):
        if own is None:
            continue
        own = tuple(own.shape[:-1] if name == "mask" else own.shape)
        try:
            shape = tuple(broadcast_shapes(shape, own))
        except RuntimeError:
            raise ValueError(f"windowed_softmax: `{name}` ({'rows' if name == 'mask' else 'shape'} {own}) does not "
                             f"broadcast with the rows {shape} of `scores`") from None


def _known_differ(a, b) -> bool:
    """Sizes known to differ (a symbolic size under tracing is checked again on the real call)."""
    return isinstance(a, int) and isinstance(b, int) and a != b


def _batch_shape(scores, row_starts, row_ends, mask):
    shapes = [scores.shape[:-1]]
    shapes += [t.shape for t in (row_starts, row_ends) if t is not None]
    if mask is not None:
        shapes.append(mask.shape[:-1])
    return broadcast_shapes(*shapes)


def window_keep(n, row_starts=None, row_ends=None, mask=None, device=None):
    """The bool ``keep`` of the op (None when nothing is masked)."""
    keep = None
    if row_starts is not None or row_ends is not None:
        pos = torch.arange(n, device=device)
        if row_starts is not None:
            keep = pos >= row_starts.unsqueeze(-1)
        if row_ends is not None:
            before = pos < row_ends.unsqueeze(-1)
            keep = before if keep is None else keep & before
    if mask is not None:
        keep = mask if keep is None else keep & mask
    return keep


def windowed_softmax_reference(scores, row_starts=None, row_ends=None, mask=None, out_dtype=None):
    """Plain-torch definition of the op (its CPU path, and the oracle of every test)."""
    out_dtype = out_dtype or scores.dtype
    n = scores.shape[-1]
    keep = window_keep(n, row_starts, row_ends, mask, scores.device)
    x = scores
    if keep is not None:
        x = torch.where(keep, x, torch.tensor(float("-inf"), dtype=x.dtype, device=x.device))
    x = x.expand(*_batch_shape(scores, row_starts, row_ends, mask), n)
    return torch.softmax(x, dim=-1, dtype=out_dtype)


def _rows3(t, batch, last):
    """View ``t`` (broadcast to ``(*batch, last)``) as [A, S, last] without copying when possible."""
    t = t.expand(*batch, last)
    if len(batch) == 0:
        return t.unsqueeze(0).unsqueeze(0)
    if len(batch) == 1:
        return t.unsqueeze(0)
    try:
        return t.view(-1, batch[-1], last)
    except RuntimeError:
        return t.reshape(-1, batch[-1], last)


if triton is not None:

    @triton.jit(do_not_specialize=["S", "N"])
    def _windowed_softmax_kernel(
        x_ptr, xs0, xs1, xs2, st_ptr, sts0, sts1, en_ptr, ens0, ens1, m_ptr, ms0, ms1, ms2, o_ptr,
        S, N,
        HAS_STARTS: tl.constexpr, HAS_ENDS: tl.constexpr, HAS_MASK: tl.constexpr,
        OUT_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        a = row // S
        s = row % S
        lane = tl.arange(0, BLOCK)
        lo = row * 0
        hi = row * 0 + N
        if HAS_STARTS:
            lo = tl.maximum(tl.load(st_ptr + a * sts0 + s * sts1).to(tl.int64), 0)
        if HAS_ENDS:
            hi = tl.minimum(tl.load(en_ptr + a * ens0 + s * ens1).to(tl.int64), hi)
        x_row = x_ptr + a * xs0 + s * xs1
        m_row = m_ptr + a * ms0 + s * ms1
        # Pass 1: online max and sum over the window only (masked lanes are -inf and contribute 0).
        m = tl.full((), float("-inf"), tl.float32)
        l = tl.full((), 0.0, tl.float32)
        for start in range(lo, hi, BLOCK):
            cols = start + lane
            keep = cols < hi
            if HAS_MASK:
                keep = keep & (tl.load(m_row + cols * ms2, mask=keep, other=0) != 0)
            x = tl.load(x_row + cols * xs2, mask=keep, other=float("-inf")).to(OUT_DTYPE).to(tl.float32)
            x = tl.where(keep, x, float("-inf"))
            m_new = tl.maximum(m, tl.max(x, 0))
            finite = m_new != float("-inf")
            alpha = tl.where(finite, tl.exp(m - m_new), 1.0)
            p = tl.where(finite, tl.exp(x - m_new), 0.0)  # masked lanes: exp(-inf) = 0
            l = l * alpha + tl.sum(p, 0)
            m = m_new
        # A row with no kept finite maximum, or a NaN sum (kept NaN or +inf), is NaN everywhere (as eager).
        ok = (m != float("-inf")) & (l == l)
        outside = tl.where(ok, 0.0, float("nan"))
        # Pass 2: the dense output row.
        if N % 16 == 0:
            # Rows then start 64-byte aligned: with the hint, the full tiles' (zero) stores vectorize even
            # when N is not specialized (torch.compile with dynamic shapes passes it as a plain int).
            _write_row(o_ptr + tl.multiple_of(row * N, 16), x_row, xs2, m_row, ms2, lo, hi, m, l, outside, N,
                       HAS_MASK, OUT_DTYPE, BLOCK)
        else:
            _write_row(o_ptr + row * N, x_row, xs2, m_row, ms2, lo, hi, m, l, outside, N,
                       HAS_MASK, OUT_DTYPE, BLOCK)

    @triton.jit
    def _tile(start, x_row, xs2, m_row, ms2, lo, hi, m, l, outside,
              HAS_MASK: tl.constexpr, OUT_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
        """Output values of positions [start, start + BLOCK): only a tile that meets the window reads scores."""
        cols = start + tl.arange(0, BLOCK)
        if (start < hi) & (start + BLOCK > lo):
            keep = (cols >= lo) & (cols < hi)
            if HAS_MASK:
                keep = keep & (tl.load(m_row + cols * ms2, mask=keep, other=0) != 0)
            x = tl.load(x_row + cols * xs2, mask=keep, other=0.0).to(OUT_DTYPE).to(tl.float32)
            y = tl.where(keep, tl.exp(x - m) / l, 0.0) + outside  # outside: 0 or NaN
        else:
            y = tl.zeros((BLOCK,), tl.float32) + outside
        return y.to(OUT_DTYPE)

    @triton.jit
    def _write_row(o_row, x_row, xs2, m_row, ms2, lo, hi, m, l, outside, N,
                   HAS_MASK: tl.constexpr, OUT_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
        """Store one output row: full tiles unmasked (so that they can vectorize), then the masked tail."""
        lane = tl.arange(0, BLOCK)
        full = N - N % BLOCK
        for start in range(0, full, BLOCK):
            tl.store(o_row + start + lane,
                     _tile(start, x_row, xs2, m_row, ms2, lo, hi, m, l, outside, HAS_MASK, OUT_DTYPE, BLOCK))
        if full < N:
            tl.store(o_row + full + lane,
                     _tile(full, x_row, xs2, m_row, ms2, lo, hi, m, l, outside, HAS_MASK, OUT_DTYPE, BLOCK),
                     mask=full + lane < N)


_TL_DTYPES = {}
if triton is not None:
    _TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def windowed_softmax_triton(scores, row_starts=None, row_ends=None, mask=None, out_dtype=None,
                            block=None, num_warps=None):
    """Run the Triton kernel (the op's CUDA path; tests and tuning call it directly).

    ``block`` (positions per tile, a power of two) and ``num_warps`` are tunables; tests shrink
    ``block`` so that multi-tile windows run at small sizes under ``TRITON_INTERPRET=1``.
    """
    if triton is None:
        raise RuntimeError("windowed_softmax: triton is not installed")
    out_dtype = out_dtype or scores.dtype
    by_metadata(_check_args, scores, row_starts, row_ends, mask, out_dtype)
    n = scores.shape[-1]
    if n >= 2**31 - 1:
        raise ValueError(f"windowed_softmax: the last dim of `scores` ({n}) must be < 2**31 - 1")
    batch = _batch_shape(scores, row_starts, row_ends, mask)
    rows = math.prod(batch)
    out = scores.new_empty(*batch, n, dtype=out_dtype)
    if rows == 0 or n == 0:
        return out
    x3 = _rows3(scores, batch, n)
    st3 = _rows3(row_starts.unsqueeze(-1), batch, 1) if row_starts is not None else x3
    en3 = _rows3(row_ends.unsqueeze(-1), batch, 1) if row_ends is not None else x3
    m3 = _rows3(mask, batch, n) if mask is not None else x3
    _windowed_softmax_kernel[(rows,)](
        x3, *x3.stride(), st3, *st3.stride()[:2], en3, *en3.stride()[:2], m3, *m3.stride(), out,
        batch[-1] if len(batch) else 1, n,
        HAS_STARTS=row_starts is not None, HAS_ENDS=row_ends is not None, HAS_MASK=mask is not None,
        OUT_DTYPE=_TL_DTYPES[out_dtype], BLOCK=block or BLOCK, num_warps=num_warps or NUM_WARPS)
    return out


@fused_op(OP_NAME)
def windowed_softmax(
    scores: torch.Tensor,
    row_starts: Optional[torch.Tensor],
    row_ends: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Fused ``softmax(where(keep, scores, -inf), dim=-1, dtype=out_dtype)``.

    Args:
        scores: ``[..., N]`` float32 / float16 / bfloat16 (any strides).
        row_starts, row_ends: optional int32/int64 ``[...]`` per-row bounds (broadcast with the rows):
            positions ``row_starts <= j < row_ends`` are kept.
        mask: optional bool ``[..., N]`` (broadcastable), True keeps.
        out_dtype: float32 / float16 / bfloat16; the scores are rounded to it first, as
            ``softmax(dtype=...)`` does.

    Returns:
        ``[*batch, N]`` in ``out_dtype``: 0 outside the window, NaN rows where eager has them.

    Raises:
        ValueError / TypeError naming the argument: bad rank, dtype, device or broadcast.
    """
    if scores.device.type != "cuda":  # (on CUDA, the *_triton function checks them)
        _check_args(scores, row_starts, row_ends, mask, out_dtype)
        return windowed_softmax_reference(scores, row_starts, row_ends, mask, out_dtype)
    out = windowed_softmax_triton(scores, row_starts, row_ends, mask, out_dtype)
    if VERIFY:
        why = softmax_mismatch(windowed_softmax_reference(scores, row_starts, row_ends, mask, out_dtype), out)
        if why is not None:
            raise AssertionError(f"dsa_inductor verify: rule windowed_softmax ({OP_NAME}) differs from eager: {why}")
    return out


@windowed_softmax.register_fake
def _windowed_softmax_fake(scores, row_starts, row_ends, mask, out_dtype):
    # Shapes only (the op body's launch arithmetic would specialize dynamic shapes).
    _check_args(scores, row_starts, row_ends, mask, out_dtype)
    batch = _batch_shape(scores, row_starts, row_ends, mask)
    return scores.new_empty(*batch, scores.shape[-1], dtype=out_dtype)
