"""Equivalence contracts and tolerances: the one place that says how close compiled must be to eager.

Every test of the package, and verify mode (``register_dsa_passes(verify=True)``), compares through these
functions.  Each ``*_mismatch`` function returns ``None`` when the contract holds, else a message that
names the first differing element by its full index; each ``assert_*`` raises ``AssertionError`` with it.

Contracts per rule (the fused op against the eager subgraph it replaced):

=================  ================================================================================
rule               contract
=================  ================================================================================
mask_topk          ``topk_mismatch``: the same multiset of selected values as ``torch.topk`` (values
                   exact, NaN == NaN), indices unique and in ``[0, N)``, the value at each index equal
                   to the masked logits there, descending when ``sorted``.  Ties may pick other
                   indices.  NaN rank above +inf (``torch.topk``'s order); which of several NaNs is
                   picked is unspecified, as in eager.
windowed_softmax   ``softmax_mismatch``: ``TOLERANCES[out dtype]`` elementwise, NaN at the same places,
                   exactly 0 outside the window.
index_score        ``score_mismatch`` with ``index_score_tolerance``: fp32 output, elementwise
                   ``(D + H + 8) * 2**-24 * M`` (the fp32 sum-of-products bound, ``M`` the score of the
                   absolute values); non-finite elements exactly equal.
gather_dequant     ``exact_mismatch``: bit-equal (NaN == NaN): a gather and one rounding, no sums.
windowed_attention ``windowed_attention_mismatch``: ``ATTENTION_TOLERANCES`` of the lower precision of q's
                   dtype and the output's, NaN rows at the same places.
sparse_attention   ``attention_mismatch``: ``ATTENTION_TOLERANCES[out dtype]``, NaN rows at the same places.
causal_sdpa        ``attention_mismatch``: the same fused SDPA kernel with ``is_causal=True`` in place of the
                   causal bias; ``ATTENTION_TOLERANCES[out dtype]``.
loop lifting       ``exact_mismatch``: bit-equal.
=================  ================================================================================
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch


@dataclasses.dataclass(frozen=True)
class Tol:
    rtol: float
    atol: float


# Elementwise tolerances for results whose rounding may differ from eager's (a reduction in another
# order, exp/log from another library): one row per result dtype.  rtol ~ 2 ulp of the dtype.
TOLERANCES = {
    torch.float32: Tol(rtol=1e-5, atol=1e-6),
    torch.float16: Tol(rtol=2e-3, atol=1e-5),
    torch.bfloat16: Tol(rtol=1.6e-2, atol=1e-5),
}
EXACT = Tol(rtol=0.0, atol=0.0)


def tol(dtype: torch.dtype) -> Tol:
    """The tolerance of ``dtype`` (exact for integer and bool results)."""
    return TOLERANCES.get(dtype, EXACT)


def _index(flat: int, shape: Sequence[int]) -> tuple:
    out = []
    for d in reversed(tuple(shape)):
        out.append(flat % d if d else 0)
        flat = flat // d if d else 0
    return tuple(reversed(out))


def _first(bad: torch.Tensor) -> tuple:
    """Full index of the first True element of ``bad`` (row-major)."""
    return _index(int(bad.reshape(-1).nonzero()[0]), bad.shape)


def _same_meta(actual, expected) -> Optional[str]:
    if tuple(actual.shape) != tuple(expected.shape):
        return f"shape {tuple(actual.shape)} != eager's {tuple(expected.shape)}"
    if actual.dtype != expected.dtype:
        return f"dtype {actual.dtype} != eager's {expected.dtype}"
    return None


def close_mismatch(actual, expected, rtol: Optional[float] = None, atol: Optional[float] = None) -> Optional[str]:
    """``|actual - expected| <= atol + rtol * |expected|`` (default: ``tol(expected.dtype)``); NaN at the
    same places; infinities equal."""
    why = _same_meta(actual, expected)
    if why:
        return why
    t = tol(expected.dtype)
    rtol = t.rtol if rtol is None else rtol
    atol = t.atol if atol is None else atol
    a, e = actual.detach().to(expected.device), expected.detach()
    if not e.is_floating_point():
        bad = a != e
    else:
        af, ef = a.double(), e.double()
        finite = torch.isfinite(ef)
        bad = torch.where(finite, ~((af - ef).abs() <= atol + rtol * ef.abs()),
                          ~((af == ef) | (af.isnan() & ef.isnan())))
    if bad.any():
        i = _first(bad)
        return f"element {i}: {a[i].item()!r} vs eager {e[i].item()!r} (rtol {rtol:g}, atol {atol:g})"
    return None


def exact_mismatch(actual, expected) -> Optional[str]:
    """Bit-equal values (NaN equal to NaN), same shape and dtype."""
    return close_mismatch(actual, expected, rtol=0.0, atol=0.0)


# ---- top-k (rule mask_topk) -------------------------------------------------------------------------------

def _nan_top(x):
    """NaN as +inf (topk ranks NaN first), leaving +-inf themselves alone (plain nan_to_num would turn
    them into +-finfo.max, so -inf and -3.4e38 would compare equal)."""
    return torch.where(x.isnan(), float("inf"), x)


def topk_mismatch(masked, k, values, indices, sorted=True, need_values=True) -> Optional[str]:
    """Why ``(values, indices)`` is not a valid top-k of ``masked`` along its last dim (None if it is).

    Equivalence contract: the same multiset of selected values as ``torch.topk``, indices unique and
    in ``[0, N)``, each value equal to ``masked`` at its index, and descending order when ``sorted``.
    Ties may pick other indices than eager.  Positions are reported as full indices ``(*batch, slot)``.
    """
    n = masked.shape[-1]
    batch = tuple(masked.shape[:-1])
    if tuple(indices.shape) != (*batch, k):
        return f"indices have shape {tuple(indices.shape)}, expected {(*batch, k)}"
    if need_values and tuple(values.shape) != tuple(indices.shape):
        return f"values have shape {tuple(values.shape)}, expected {tuple(indices.shape)}"
    if k == 0 or indices.numel() == 0:
        return None
    rows_m = masked.reshape(-1, n)
    idx = indices.reshape(-1, k).long().to(rows_m.device)

    def at(r, j):
        return (*_index(r, batch), j)

    bad = (idx < 0) | (idx >= n)
    if bad.any():
        r, j = bad.nonzero()[0].tolist()
        return f"index {idx[r, j].item()} at {at(r, j)} is outside [0, {n})"
    if k > 1:
        srt, order = idx.sort(dim=-1, stable=True)
        dup_sorted = torch.zeros_like(idx, dtype=torch.bool)
        dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]  # the later slot of each repeat (stable sort)
        dup = torch.zeros_like(dup_sorted).scatter(1, order, dup_sorted)
        if dup.any():
            r, j = dup.nonzero()[0].tolist()
            return f"index {idx[r, j].item()} at {at(r, j)} was already selected in an earlier slot"
    picked = rows_m.gather(-1, idx).float()
    if need_values:
        got = values.reshape(-1, k).float().to(picked.device)
        diff = ~((got == picked) | (got.isnan() & picked.isnan()))
        if diff.any():
            r, j = diff.nonzero()[0].tolist()
            return (f"value {got[r, j].item()} at {at(r, j)} != logits[{(*_index(r, batch), idx[r, j].item())}]"
                    f" = {picked[r, j].item()}")
    ref = torch.topk(rows_m.float(), k, dim=-1).values
    mine = torch.sort(_nan_top(picked), dim=-1, descending=True).values
    ref_s = torch.sort(_nan_top(ref), dim=-1, descending=True).values
    diff = mine != ref_s
    if diff.any():
        low = _nan_top(picked) < ref_s[:, -1:]  # a slot below eager's k-th largest value: surely wrong
        if low.any():
            r, j = low.nonzero()[0].tolist()
            return (f"slot {at(r, j)} selects position {idx[r, j].item()} = {picked[r, j].item()}, below eager's "
                    f"{k}-th largest value {ref_s[r, -1].item()}")
        r, j = diff.nonzero()[0].tolist()
        return (f"row {_index(r, batch)}: the {j}-th largest selected value is {mine[r, j].item()}, eager "
                f"selects {ref_s[r, j].item()}")
    if sorted and k > 1:
        p = _nan_top(picked)
        up = p[:, 1:] > p[:, :-1]
        if up.any():
            r, j = up.nonzero()[0].tolist()
            return f"not sorted descending at {at(r, j + 1)}"
    return None


def topk_values_mismatch(values, eager_values, sorted=True) -> Optional[str]:
    """Values-only top-k: the same multiset as eager's (exact, NaN == NaN); in eager's order when sorted."""
    why = _same_meta(values, eager_values)
    if why:
        return why
    if not sorted and values.numel():
        values = torch.sort(_nan_top(values.float()), dim=-1, descending=True).values
        eager_values = torch.sort(_nan_top(eager_values.float()), dim=-1, descending=True).values
    return exact_mismatch(values, eager_values)


# ---- softmax (rule windowed_softmax) ---------------------------------------------------------------------

def softmax_mismatch(ref, out, keep=None, atol=None, rtol=None) -> Optional[str]:
    """Why ``out`` differs from eager's ``ref`` (None if it agrees).

    NaNs must be at the same positions, other values within ``TOLERANCES[ref.dtype]``; where ``keep`` (bool,
    broadcastable) is given, positions outside it must be exactly 0 in non-NaN rows.  (Inside the window a
    value that underflows may be 0 on one side and a denormal on the other: eager's CPU ``exp`` differs.)
    """
    why = _same_meta(out, ref)
    if why:
        return why
    t = tol(ref.dtype)
    rtol, atol = rtol or t.rtol, atol or t.atol
    r, o = ref.float(), out.float().to(ref.device)
    bad = (r.isnan() != o.isnan()) | (~r.isnan() & ((r - o).abs() > atol + rtol * r.abs()))
    if keep is not None:
        bad |= (~keep.to(r.device).expand(ref.shape)) & ~r.isnan() & (o != 0)
    if bad.any():
        i = _first(bad)
        return f"element {i}: eager {r[i].item()!r}, got {o[i].item()!r}"
    return None


# ---- index score (rule index_score) ----------------------------------------------------------------------

_FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def fp32_sum_bound(d: int, h: int, fp8: bool = False) -> float:
    """Relative bound of an fp32 sum over ``d`` products then ``h`` heads, in units of the absolute score.

    ``fp8``: the ``d`` products come from an FP8 tensor-core dot, whose accumulator keeps about 14 bits of
    mantissa on Hopper (DeepSeek-V3 technical report, section 3.3.2: "limited to retaining around 14 bits"),
    so each of those additions rounds at ``2**-14`` rather than fp32's ``2**-24``."""
    return d * 2.0 ** (-14 if fp8 else -24) + (h + 8) * 2.0**-24


def index_score_tolerance(q, k, weights, scale=1.0, row_ends=None, row_starts=None, k_scale=None):
    """Elementwise bound on ``|ours - eager|`` for ``index_score``: ``fp32_sum_bound(D, H, fp8) * M`` where
    ``M`` is the score of ``|q|, |k|, |weights|, |scale|``, plus the underflow term of fp32's subnormals
    (each product may lose up to ``2**-150`` absolute, in ours and in eager's alike):
    ``2**-149 * (((|scale| * D + 1) * sum_h |w| + H + 1) * |k_scale| + 1)`` (``|k_scale|`` 1 without one).
    The second term matters only for scores near ``2**-126`` and below."""
    from .lowerings.index_score import index_score_reference

    # Non-finite inputs give a non-finite result (compared exactly) or an exact 0 after the relu: they
    # take no part in the rounding bound.
    def fin(x):
        return torch.where(torch.isfinite(x), x.abs(), 0).to(x.dtype)

    ks = fin(k_scale) if k_scale is not None else None
    mag = index_score_reference(fin(q.float()), fin(k.float()), fin(weights), abs(scale), False, row_ends,
                                row_starts, k_scale=ks)
    mag = torch.where(torch.isfinite(mag), mag, 0.0)
    fp8 = q.dtype in _FP8_DTYPES or k.dtype in _FP8_DTYPES
    d, h = q.shape[-1], q.shape[-2]
    under = ((abs(scale) * d + 1) * fin(weights.float()).sum(-1) + h + 1).unsqueeze(-1)  # [B, S, 1]
    if ks is not None:
        under = under * ks.float().unsqueeze(1)
    return fp32_sum_bound(d, h, fp8) * mag + 2.0**-149 * (under + 1)


def score_mismatch(ours, ref, tol_) -> Optional[str]:
    """Why ``ours`` is not ``ref`` within the elementwise tensor ``tol_`` (None if it is); NaN and inf must
    agree exactly."""
    why = _same_meta(ours, ref)
    if why:
        return why
    ours = ours.to(ref.device)
    finite = torch.isfinite(ref)
    bad = torch.where(finite, ~((ours - ref).abs() <= tol_), ~((ours == ref) | (ours.isnan() & ref.isnan())))
    if bad.any():
        idx = _first(bad)
        return (f"element {idx}: {ours[idx].item()!r} vs eager {ref[idx].item()!r} "
                f"(tolerance {tol_[idx].item():.3g})")
    return None


# ---- assertions ------------------------------------------------------------------------------------------

def _raise(why: Optional[str], what: str = "") -> None:
    if why is not None:
        raise AssertionError(f"{what}: {why}" if what else why)


def assert_close(actual, expected, rtol=None, atol=None, what: str = "") -> None:
    _raise(close_mismatch(actual, expected, rtol, atol), what)


def assert_exact(actual, expected, what: str = "") -> None:
    _raise(exact_mismatch(actual, expected), what)


def assert_topk(masked, k, values, indices, sorted=True, need_values=True, what: str = "") -> None:
    _raise(topk_mismatch(masked, k, values, indices, sorted, need_values), what)


def assert_attention(ref, out, what: str = "") -> None:
    _raise(attention_mismatch(ref, out), what)


def assert_softmax(ref, out, keep=None, what: str = "") -> None:
    _raise(softmax_mismatch(ref, out, keep), what)


def assert_index_score(ours, ref, q, k, weights, scale=1.0, row_ends=None, what: str = "") -> None:
    _raise(score_mismatch(ours, ref, index_score_tolerance(q, k, weights, scale, row_ends)), what)



# ---- sparse attention (rule sparse_attention) ------------------------------------------------------------

# Looser than TOLERANCES: eager rounds 16-bit scores and weights to the input dtype between the two matmuls,
# the kernel keeps them in fp32.
ATTENTION_TOLERANCES = {torch.float32: Tol(rtol=1e-4, atol=1e-5), torch.float16: Tol(rtol=1e-2, atol=2e-3),
                        torch.bfloat16: Tol(rtol=4e-2, atol=2e-2)}


def attention_mismatch(ref, out, atol=None, rtol=None) -> Optional[str]:
    """Why attention output ``out`` differs from eager's ``ref`` (None if it agrees): NaN at the same
    places, values within ``ATTENTION_TOLERANCES[ref.dtype]``."""
    t = ATTENTION_TOLERANCES[ref.dtype]
    return close_mismatch(out, ref, rtol or t.rtol, atol or t.atol)


def windowed_attention_mismatch(ref, out, q_dtype) -> Optional[str]:
    """Why windowed attention output ``out`` differs from eager's ``ref`` (None if it agrees): NaN at the same
    places, values within ``ATTENTION_TOLERANCES`` of the lower precision of ``q_dtype`` and ``ref.dtype``.
    The scores are rounded to q's dtype, so a one-ulp difference there (from another summation order in
    ``q @ k^T``) moves even an fp32 output (fp32 ``v``) by a 16-bit amount."""
    t = max(ATTENTION_TOLERANCES[q_dtype], ATTENTION_TOLERANCES[ref.dtype], key=lambda x: x.rtol)
    return close_mismatch(out, ref, t.rtol, t.atol)
