"""``dsa_inductor::index_score``: the DSA indexer's score, never materializing ``[B, S, H, T]``.

Idiom (transformers' ``DeepseekV32Indexer.forward``; DeepSeek-V3.2 ``Indexer``, arXiv 2512.02556)::

    scores = torch.matmul(q.float(), k.transpose(-1, -2).float().unsqueeze(1)) * softmax_scale  # [B,S,H,T]
    scores = F.relu(scores)
    index_scores = torch.matmul(weights.unsqueeze(-2), scores).squeeze(-2)                     # [B,S,T]

Semantics (``q [B, S, H, D]``, ``k [B, T, D]`` (or ``[1, T, D]``), ``weights [B, S, H]``)::

    x[b,s,h,t] = q[b,s,h,:].float() . k[b,t,:].float()                  (fp32)
    y          = relu(x * scale)   if not scale_after_relu  else  relu(x) * scale
    out[b,s,t] = sum_h weights[b,s,h].float() * y[b,s,h,t]               (fp32, [B, S, T])

Row bounds (optional ``row_starts`` / ``row_ends``, int32/int64 ``[B, S]``): each row's range is
``[lo, hi)`` with ``lo = clamp(row_starts, 0, T)`` (0 without starts) and ``hi = clamp(row_ends, lo, T)``
(T without ends), as ``masked_topk`` reads its bounds.  Positions outside the range are

* ``-inf`` (``outside_undefined=False``): the causal / range mask that follows in the indexer, as
  ``masked_fill(~keep, -inf)`` writes it.  Key tiles entirely outside a row tile's ranges are written as
  ``-inf`` without reading q or k;
* **undefined** (``outside_undefined=True``): never written (the buffer is ``torch.empty``).  Only a fused
  consumer that never reads them may see such a buffer: ``dsa_inductor::masked_topk`` with the same
  bounds, a ``-inf`` fill and no mask or bias (the ``mask_topk`` rule's follow-up ``bound_index_scores``
  is the one place that sets it, and only when that top-k is the scores' only user).  Key tiles outside
  every range of a row tile are not computed at all, so causal rows cost about half of full rows.
  Rows whose in-range length ``hi - lo`` is at most ``short_k`` (``short_k >= 0``) are wholly undefined
  and are skipped, decided per row inside the kernel (no host sync, CUDA-graph safe): with ``k >=``
  the in-range length, a range top-k selects every in-range position whatever the scores (SGLang's
  short-prefill observation), and ``masked_topk`` short-circuits such rows without reading a score when
  it writes no values (``sorted=False``, ``need_values=False``).  The CPU path writes NaN at undefined
  positions, so a consumer that reads one shows it in the tests.

FP8 (DeepSeek's reference ``fp8_index``, ``inference/kernel.py``): ``q`` and ``k`` may both be
``float8_e4m3fn`` (the kernel reads the FP8 bytes and runs an FP8 ``tl.dot``; there is no dequantized
copy), with the per-token-head q scale folded into ``weights`` by the caller (as DeepSeek's ``Indexer``
does: ``weights * q_scale * softmax_scale``) and an optional per-token k scale ``k_scale [B, T]`` (or
``[1, T]``) fp32, applied to the head sum::

    out[b,s,t] = k_scale[b,t] * sum_h weights[b,s,h] * relu(q8[b,s,h,:].float() . k8[b,t,:].float() * scale)

``k_scale`` is accepted with any input dtype.

Gathered FP8 keys (``k_slots``; the DSA indexer's FP8 K cache as DeepSeek-V3.2's reference ``Indexer`` and
vLLM's ``cp_gather_indexer_k_quant_cache`` read it): ``k`` is the cache itself, uint8 / float8_e4m3fn
``[P, D]`` or pages ``[P, B, D]``, with a per-token scale table ``k_cache_scale`` (``[P, 1]`` / ``[P, B, 1]``),
and key ``t`` of batch ``b`` is ``e4m3(k[k_slots[b, t]]) * k_cache_scale[k_slots[b, t]]`` in fp32, exactly
``dsa_inductor::gather_dequant``'s result (padding slots with ``k_zero_negative``, wrapping, and zero keys
for slots outside the cache on CUDA).  The kernel loads each key tile's FP8 bytes by slot and dequantizes
them in registers, so no dequantized copy of the keys is ever written; the dots are then eager's
``q.float() @ k`` on fp32 keys.  For bf16 / e4m3 ``q`` (any fp32 keys, gathered or given) each key tile is
split into three bf16 tiles that sum to it exactly (``_split3``) and scored with three bf16 tensor-core dots,
which give every product ``q_d * k_d`` exactly when all parts and products are normal numbers and q is finite;
fp16 and fp32 ``q`` take one fp32 FMA dot ("ieee").  Where the split is not exact (``_split_exact``: an inf in
a q row meets a zero ``mid`` / ``lo`` part as ``inf * 0 = NaN`` where eager's ``inf * k`` is +-inf; keys below
``2**-102``, or ``|q| * |k|`` below it, put a part or a part's product among the subnormals) a fix-up
launch recomputes the tile with the fp32 FMA dot: the main kernel stores each tile's smallest nonzero key
magnitude, ``_q_stats_kernel`` each q row's smallest nonzero magnitude (0 for a row with an inf), and the
fix-up launch (``_index_score_fixup_kernel``, on a grid of its own: fine tiles in the rows layout, groups of key
tiles in the heads layout) rescores only the flagged tiles.  The hot loop has no branch, and nothing waits
on the host (CUDA-graph safe).  The ``index_score`` rule's follow-up ``read_fp8_cache`` folds a
``gather_dequant`` that feeds a score into this form.

Rounding: FP8 and bf16/fp16 products are exact in fp32, so the only differences with eager are the order of the
fp32 sums over ``D`` and ``H`` (the scale, the relu and the weight are applied per element in eager's
order).  Tolerance (``tolerance()``):
``|ours - eager| <= (D + H + 8) * 2**-24 * M`` elementwise, where ``M`` is this op on ``|q|, |k|,
|weights|, |scale|`` (the standard bound for fp32 sums of products).  NaN and inf propagate as in eager.

CUDA path (``index_score_triton``): one program per ``BLOCK_S`` query rows x ``BLOCK_T`` keys of one batch;
``k^T [D, BLOCK_T]`` is loaded once, then for each head ``tl.dot(q_h [BLOCK_S, D], k^T)`` (fp32
accumulation; fp32 inputs with ``input_precision="ieee"``, as eager's fp32 matmul without TF32), relu,
times the head's weight, summed into an fp32 ``[BLOCK_S, BLOCK_T]`` register tile.  Programs of one row tile
are adjacent so its q rows are read from L2 by every key tile.  With few query rows per batch (decode: one
row per request; MTP: a few) a tile of 64 query rows would hold one real row and waste the rest of every dot,
so there the kernel takes the *heads layout*: the (query row, head) pairs are the rows of one
``[BLOCK_S * H, D] x [D, BLOCK_T]`` dot per key tile, and the weighted relu is summed over heads afterwards
(DeepGEMM's ``fp8_mqa_logits`` / ``fp8_paged_mqa_logits`` put the heads on the MMA's M dim the same way).

CPU path: plain torch, exactly transformers' spelling, run eagerly inside the compiled graph (the op is an
extern kernel call there; Inductor does not trace into it).
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch

from .gather_dequant import scales_from_bytes
from .host import by_metadata, cdiv, next_pow2
from .registry import fused_op

from ..testing import index_score_tolerance, score_mismatch  # noqa: F401  (the contract; re-exported)

try:  # triton is optional on CPU-only installs; the CPU path never needs it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None

OP_NAME = "dsa_inductor::index_score"
VERIFY = False  # set by register_dsa_passes(verify=True): check each CUDA call against eager

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_QK_DTYPES = _FLOATS + (torch.float8_e4m3fn,)


def _check_gather(k, k_slots, k_cache_scale, k_block_size):
    """The gathered-k arguments (``k_slots`` given): ``k`` is an FP8 e4m3 cache with a per-token scale."""
    if not isinstance(k_slots, torch.Tensor) or k_slots.dim() != 2:
        raise ValueError(f"index_score: `k_slots` must be a [B, T] (or [1, T]) int tensor, got "
                         f"{getattr(k_slots, 'shape', type(k_slots))}")
    if k_cache_scale is None:
        raise ValueError("index_score: `k_cache_scale` is required with `k_slots` (the per-token scale table)")
    if not isinstance(k, torch.Tensor) or k.dim() not in (2, 3):
        raise ValueError(f"index_score: `k` must be a [P, D] or [P, B, D] FP8 cache with `k_slots`, got "
                         f"{getattr(k, 'shape', type(k))}")
    if (k.dim() == 3) != (k_block_size > 0):
        raise ValueError(f"index_score: `k_block_size` must be > 0 for a [P, B, D] cache and 0 for a [P, D] cache, "
                         f"got {k_block_size} for shape {tuple(k.shape)}")
    if k.dtype not in (torch.uint8, torch.float8_e4m3fn):
        raise TypeError(f"index_score: `k` must be a uint8 or float8_e4m3fn cache with `k_slots`, got {k.dtype}")
    if k_slots.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"index_score: `k_slots` must be int32 or int64, got {k_slots.dtype}")
    if not isinstance(k_cache_scale, torch.Tensor) or k_cache_scale.dtype not in _FLOATS \
            or k_cache_scale.dim() != k.dim() or k_cache_scale.shape[-1] != 1:
        raise ValueError(f"index_score: `k_cache_scale` must be one float per cache row, shape "
                         f"{(*k.shape[:-1], 1)}, got {tuple(getattr(k_cache_scale, 'shape', ()))} "
                         f"{getattr(k_cache_scale, 'dtype', type(k_cache_scale).__name__)}")
    if k.dim() == 3:  # slot = page * k_block_size + pos; a page view may hold more rows than the block
        torch._check_value(k_block_size <= k.shape[1] and k_block_size <= k_cache_scale.shape[1],
                           lambda: f"index_score: `k_block_size` ({k_block_size}) exceeds the page dim of `k` "
                                   f"({k.shape[1]}) or of `k_cache_scale` ({k_cache_scale.shape[1]})")


def _logical_k_shape(k, k_slots):
    """``[B, T, D]``: the shape of the keys the op scores (the gathered rows when ``k_slots`` is given)."""
    return tuple(k.shape) if k_slots is None else (k_slots.shape[0], k_slots.shape[1], k.shape[-1])


def _check_args(q, k, weights, scale, row_ends, row_starts=None, short_k=-1, outside_undefined=False,
                k_scale=None, k_slots=None, k_cache_scale=None, k_block_size=0):
    """Raise ValueError/TypeError naming the offending argument."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"index_score: `q` must be a [B, S, H, D] tensor, got {getattr(q, 'shape', type(q))}")
    if q.dtype not in _QK_DTYPES:
        raise TypeError(f"index_score: `q` must be float32, float16, bfloat16 or float8_e4m3fn, got {q.dtype}")
    if k_slots is not None:
        _check_gather(k, k_slots, k_cache_scale, k_block_size)
    else:
        if k_cache_scale is not None or k_block_size != 0:
            raise ValueError("index_score: `k_cache_scale` / `k_block_size` are only taken with `k_slots`")
        if not isinstance(k, torch.Tensor) or k.dim() != 3:
            raise ValueError(f"index_score: `k` must be a [B, T, D] tensor, got {getattr(k, 'shape', type(k))}")
        if k.dtype != q.dtype and k.dtype != torch.float32:
            raise TypeError(f"index_score: `k` must have the dtype of `q` ({q.dtype}) or be float32, got {k.dtype}")
    kshape = _logical_k_shape(k, k_slots)
    if not isinstance(weights, torch.Tensor) or weights.dim() != 3:
        raise ValueError(f"index_score: `weights` must be a [B, S, H] tensor, got "
                         f"{getattr(weights, 'shape', type(weights))}")
    if weights.dtype not in _FLOATS:
        raise TypeError(f"index_score: `weights` must be float32, float16 or bfloat16, got {weights.dtype}")
    for name, t in (("k", k), ("weights", weights), ("row_ends", row_ends), ("row_starts", row_starts),
                    ("k_scale", k_scale), ("k_slots", k_slots), ("k_cache_scale", k_cache_scale)):
        if t is not None and t.device != q.device:
            raise ValueError(f"index_score: `{name}` is on {t.device}, `q` on {q.device}")
    b, s, h, d = q.shape
    torch._check_value(kshape[-1] == d, lambda: f"index_score: `k` has head dim {kshape[-1]}, `q` has {d}")
    kname = "k" if k_slots is None else "k_slots"
    torch._check_value(kshape[0] == b or kshape[0] == 1,
                       lambda: f"index_score: `{kname}` has batch {kshape[0]}, `q` has {b} (or 1 to broadcast)")
    torch._check_value(weights.shape[0] == b and weights.shape[1] == s and weights.shape[2] == h,
                       lambda: f"index_score: `weights` has shape {tuple(weights.shape)}, expected [B, S, H] = "
                               f"{(b, s, h)}")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"index_score: `scale` must be a finite number, got {scale!r}")
    for name, t in (("row_ends", row_ends), ("row_starts", row_starts)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"index_score: `{name}` must be an int32 or int64 tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
        torch._check_value(t.dim() == 2 and t.shape[0] == b and t.shape[1] == s,
                           lambda: f"index_score: `{name}` has shape {tuple(t.shape)}, expected [B, S] = {(b, s)}")
    if k_scale is not None:
        if not isinstance(k_scale, torch.Tensor) or k_scale.dtype != torch.float32:
            raise TypeError(f"index_score: `k_scale` must be a float32 tensor, got "
                            f"{getattr(k_scale, 'dtype', type(k_scale).__name__)}")
        torch._check_value(k_scale.dim() == 2 and (k_scale.shape[0] == b or k_scale.shape[0] == 1)
                           and k_scale.shape[1] == kshape[1],
                           lambda: f"index_score: `k_scale` has shape {tuple(k_scale.shape)}, expected [B, T] or "
                                   f"[1, T] = {(b, kshape[1])}")
    if not outside_undefined and short_k >= 0:
        raise ValueError(f"index_score: `short_k` ({short_k}) >= 0 needs outside_undefined=True (a short row "
                         "is left unwritten)")


def row_range(row_starts, row_ends, t, rows=None):
    """``(lo, hi)`` ``[B, S]`` int64: the clamped range ``[lo, hi)`` of each row (``rows``: the ``[B, S]``
    shape and device as a tensor, needed when neither bound is given)."""
    ref = row_starts if row_starts is not None else row_ends if row_ends is not None else rows
    lo = row_starts.long().clamp(0, t) if row_starts is not None else torch.zeros_like(ref, dtype=torch.long)
    hi = torch.maximum(row_ends.long(), lo).clamp(max=t) if row_ends is not None else torch.full_like(lo, t)
    return lo, hi


def defined_mask(t, row_starts=None, row_ends=None, short_k=-1, rows=None):
    """bool ``[B, S, T]``: the positions an ``outside_undefined=True`` call defines (in range, row not short)."""
    lo, hi = row_range(row_starts, row_ends, t, rows)
    pos = torch.arange(t, device=lo.device)
    keep = (pos >= lo.unsqueeze(-1)) & (pos < hi.unsqueeze(-1))
    return keep & ((hi - lo) > short_k).unsqueeze(-1)


def gathered_k(k, k_slots, k_cache_scale, k_block_size=0, k_zero_negative=False):
    """The keys a ``k_slots`` call scores, fp32 ``[B, T, D]``: eager's gather-dequant of the FP8 cache
    (``dsa_inductor::gather_dequant``'s definition; raises IndexError on a slot outside the cache)."""
    from .gather_dequant import gather_dequant_reference

    return gather_dequant_reference(k, k_cache_scale, k_slots, None, k_block_size, None, k_zero_negative, "e4m3",
                                    torch.float32)


def index_score_reference(q, k, weights, scale=1.0, scale_after_relu=False, row_ends=None, row_starts=None,
                          short_k=-1, outside_undefined=False, k_scale=None, k_slots=None, k_cache_scale=None,
                          k_block_size=0, k_zero_negative=False):
    """Plain-torch definition of the op, spelled as transformers spells it (the CPU path and test oracle).

    Undefined positions (``outside_undefined=True``) are NaN here."""
    if k_slots is not None:
        k = gathered_k(k, k_slots, k_cache_scale, k_block_size, k_zero_negative)
    x = torch.matmul(q.float(), k.transpose(-1, -2).float().unsqueeze(1))
    y = torch.relu(x) * scale if scale_after_relu else torch.relu(x * scale)
    out = torch.matmul(weights.float().unsqueeze(-2), y).squeeze(-2)
    if k_scale is not None:
        out = out * k_scale.unsqueeze(1)
    if row_starts is not None or row_ends is not None or outside_undefined:
        keep = defined_mask(out.shape[-1], row_starts, row_ends, short_k if outside_undefined else -1,
                            rows=out.new_empty(out.shape[:-1]))
        out = out.masked_fill(~keep, float("nan") if outside_undefined else float("-inf"))
    return out


tolerance = index_score_tolerance  # the bound lives in dsa_inductor.testing


if triton is not None:

    @triton.jit
    def _upcast(x, FP8: tl.constexpr):
        """To fp32 (the interpreter's bf16 and fp8 dots are unreliable); FP8 e4m3fn NaN (0x7F / 0xFF) stays
        NaN, which the interpreter's own conversion gets wrong."""
        if FP8:
            bits = x.to(tl.uint8, bitcast=True)
            return tl.where((bits & 0x7F) == 0x7F, float("nan"), x.to(tl.float32))
        return x.to(tl.float32)

    @triton.jit
    def _split3(x):
        """fp32 ``x`` as ``hi + mid + lo``, three bf16 tiles whose sum is exactly ``x`` (hi: the top 8
        significant bits, truncated so it never rounds up to inf; mid: the next 8; lo: the rest, at most 8
        bits).  A bf16 ``q`` times each part is an exact fp32 product, so three bf16 tensor-core dots with fp32
        accumulation give every ``q_d * k_d`` exactly, as the fp32 sum bound assumes (eager's fp32 GEMM rounds
        each product), wherever ``_split_exact`` holds; the fix-up launch rescores the other tiles.  inf / NaN
        stay in ``hi`` with zero ``mid`` and ``lo``."""
        fin = tl.abs(x) < float("inf")
        xs = tl.where(fin, x, 0.0)
        hi = (xs.to(tl.uint32, bitcast=True) & 0xFFFF0000).to(tl.float32, bitcast=True)
        r = xs - hi
        mid = (r.to(tl.uint32, bitcast=True) & 0xFFFF0000).to(tl.float32, bitcast=True)
        lo = r - mid
        return tl.where(fin, hi, x).to(tl.bfloat16), mid.to(tl.bfloat16), lo.to(tl.bfloat16)

    @triton.jit
    def _gathered_k(k_ptr, ks0, ks1, ks2, ki_ptr, kis0, kis1, kc_ptr, kcs0, kcs1, n_slots, n_scale_slots, page,
                    b, rt, rd, t_ok, d_ok, ZERO_NEGATIVE: tl.constexpr):
        """``k^T [BLOCK_D, BLOCK_T]`` fp32, dequantized in registers from the FP8 cache rows ``k_slots`` names:
        ``e4m3(cache[slot]) * cache_scale[slot]``, the fp32 product eager's gather-dequant writes, and the
        ``[BLOCK_T]`` scales (0 for a key not read).  A padding slot (negative, with ``ZERO_NEGATIVE``) or one
        outside the cache gives a zero row and is never read; other negative slots wrap once, as eager
        indexing does."""
        slot = tl.load(ki_ptr + b * kis0 + rt * kis1, mask=t_ok, other=-1).to(tl.int64)
        # The cache and its scale table are indexed alike but each within its own rows (as eager indexes
        # each tensor): a negative slot wraps by each one's size.
        total = n_slots.to(tl.int64)
        total_sc = n_scale_slots.to(tl.int64)
        slot_sc = slot
        if ZERO_NEGATIVE:
            ok = t_ok & (slot >= 0)
        else:
            slot_sc = tl.where(slot < 0, slot + total_sc, slot)
            slot = tl.where(slot < 0, slot + total, slot)
            ok = t_ok & (slot >= 0) & (slot_sc >= 0)
        ok = ok & (slot < total) & (slot_sc < total_sc)
        slot = tl.where(ok, slot, 0)
        slot_sc = tl.where(ok, slot_sc, 0)
        raw = tl.load(k_ptr + (slot // page)[None, :] * ks0 + (slot % page)[None, :] * ks1 + rd[:, None] * ks2,
                      mask=ok[None, :] & d_ok[:, None], other=0)
        x = _upcast(raw.to(tl.float8e4nv, bitcast=True), True)
        sc = tl.load(kc_ptr + (slot_sc // page) * kcs0 + (slot_sc % page) * kcs1, mask=ok, other=0.0).to(tl.float32)
        return tl.where(ok[None, :], x * sc[None, :], 0.0), sc

    @triton.jit
    def _head_scores(qh, kt, k_hi, k_mid, k_lo, scale, FP8: tl.constexpr, UPCAST: tl.constexpr,
                     Q_TO_FP32: tl.constexpr, SPLIT3: tl.constexpr, SPLIT_IEEE: tl.constexpr, IEEE: tl.constexpr,
                     SCALE_AFTER_RELU: tl.constexpr):
        """``relu(q . k * scale)`` (or ``relu(q . k) * scale``) of a ``[M, D]`` q tile against ``k^T [D, BLOCK_T]``,
        fp32 ``[M, BLOCK_T]``; with SPLIT3, ``k^T`` is given as its three exact bf16 parts (``_split3``)."""
        if (UPCAST or Q_TO_FP32) and not SPLIT3:  # Q_TO_FP32: fp32 (or dequantized) k, q.float() @ k
            qh = _upcast(qh, FP8)
        if SPLIT3:
            if SPLIT_IEEE:  # the interpreter (its bf16 dots are unreliable): the same exact products
                qf = _upcast(qh, FP8)
                x = tl.dot(qf, k_lo.to(tl.float32), input_precision="ieee")
                x = tl.dot(qf, k_mid.to(tl.float32), x, input_precision="ieee")
                x = tl.dot(qf, k_hi.to(tl.float32), x, input_precision="ieee")
            else:
                qb = qh.to(tl.bfloat16)  # exact from bf16 and e4m3
                x = tl.dot(qb, k_lo)
                x = tl.dot(qb, k_mid, x)
                x = tl.dot(qb, k_hi, x)
        elif IEEE:
            x = tl.dot(qh, kt, input_precision="ieee")
        else:
            x = tl.dot(qh, kt)
        # The scale where eager applies it, per element (so inf * 0, overflow and NaN are eager's).
        if SCALE_AFTER_RELU:
            return tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL) * scale
        return tl.maximum(x * scale, 0.0, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def _row_bounds(b, rs, s_ok, e_ptr, es0, es1, st_ptr, sts0, sts1, T, HAS_ENDS: tl.constexpr,
                    HAS_STARTS: tl.constexpr):
        """``(lo, hi)`` int64 ``[BLOCK_S]``: the clamped range of rows ``rs`` (as ``row_range``)."""
        t_len = T.to(tl.int64)
        lo = rs * 0
        hi = lo + t_len
        if HAS_STARTS:
            lo = tl.minimum(tl.maximum(tl.load(st_ptr + b * sts0 + rs * sts1, mask=s_ok, other=0).to(tl.int64),
                                       0), t_len)
        if HAS_ENDS:
            hi = tl.minimum(tl.maximum(tl.load(e_ptr + b * es0 + rs * es1, mask=s_ok, other=0).to(tl.int64),
                                       lo), t_len)
        return lo, hi

    @triton.jit
    def _live_span(lo, hi, s_ok, T, short_k, UNDEFINED_OUTSIDE: tl.constexpr):
        """``(hi_max, lo_min)``: the key span ``[lo_min, hi_max)`` that a tile's rows still need.  Rows whose
        values matter are real rows and, where positions outside the range are undefined, not short ones
        (``hi - lo <= short_k``: the top-k takes all of them without scores)."""
        live = s_ok
        if UNDEFINED_OUTSIDE:
            live = live & (hi - lo > short_k)
        return tl.max(tl.where(live, hi, 0), 0), tl.min(tl.where(live, lo, T.to(tl.int64)), 0)

    @triton.jit
    def _score_tile(
        b, s0, t0, lo, hi, kf_ptrs, q_ptr, qs0, qs1, qs2, qs3, k_ptr, ks0, ks1, ks2, w_ptr, ws0, ws1, ws2,
        ksc_ptr, kscs0, kscs1, o_ptr, os0, os1, os2, ki_ptr, kis0, kis1, kc_ptr, kcs0, kcs1,
        n_slots, n_scale_slots, page, S, T, H, D, scale,
        SCALE_AFTER_RELU: tl.constexpr, HAS_BOUNDS: tl.constexpr, HAS_KSCALE: tl.constexpr, FP8: tl.constexpr,
        GATHER: tl.constexpr, ZERO_NEGATIVE: tl.constexpr, Q_TO_FP32: tl.constexpr, SPLIT3: tl.constexpr,
        SPLIT_IEEE: tl.constexpr, UNDEFINED_OUTSIDE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HEADS: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        """Score and store the ``[BLOCK_S, BLOCK_T]`` tile of rows ``s0..`` x keys ``t0..`` of batch ``b`` (``lo``
        / ``hi``: its rows' ranges).  With SPLIT3 it also stores the tile's *split flag* at ``kf_ptrs``: a lower
        bound in (0, 1] of its nonzero fp32 keys' magnitudes (the smallest nonzero ``min(|k|, 1)``; gathered
        keys: ``2**-9`` times the smallest nonzero scale, which needs no pass over the tile), which
        ``_split_exact`` compares with the rows' q."""
        rs = (s0 + tl.arange(0, BLOCK_S)).to(tl.int64)
        rt = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        rd = tl.arange(0, BLOCK_D)
        s_ok = rs < S
        t_ok = rt < T
        d_ok = rd < D
        if GATHER:
            kt, ksc_g = _gathered_k(k_ptr, ks0, ks1, ks2, ki_ptr, kis0, kis1, kc_ptr, kcs0, kcs1, n_slots,
                                    n_scale_slots, page, b, rt, rd, t_ok, d_ok, ZERO_NEGATIVE)
        else:
            kt = tl.load(k_ptr + b * ks0 + rt[None, :] * ks1 + rd[:, None] * ks2,
                         mask=t_ok[None, :] & d_ok[:, None], other=0.0)
        if UPCAST:
            kt = _upcast(kt, FP8)
        if SPLIT3:  # fp32 keys as three bf16 tiles, exactly (see _split3)
            k_hi, k_mid, k_lo = _split3(kt)
            if GATHER:  # a nonzero e4m3 value is at least 2**-9: each key is 0 or >= 2**-9 |scale| (a vector)
                ka = tl.abs(ksc_g) * 2.0 ** -9
                tl.store(kf_ptrs, tl.min(tl.where(ka > 0, tl.minimum(ka, 1.0), 1.0), 0))  # (NaN: not > 0)
            else:
                ka = tl.abs(kt)
                tl.store(kf_ptrs, tl.min(tl.min(tl.where(ka > 0, tl.minimum(ka, 1.0), 1.0), 1), 0))
        else:
            k_hi, k_mid, k_lo = kt, kt, kt  # (unused)
        if HEADS:
            m = tl.arange(0, BLOCK_S * BLOCK_H)
            ms = s0 + (m // BLOCK_H).to(tl.int64)
            mh = m % BLOCK_H
            m_ok = (ms < S) & (mh < H)
            qm = tl.load(q_ptr + b * qs0 + ms[:, None] * qs1 + mh[:, None] * qs2 + rd[None, :] * qs3,
                         mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            wm = tl.load(w_ptr + b * ws0 + ms * ws1 + mh * ws2, mask=m_ok, other=0.0).to(tl.float32)
            y = _head_scores(qm, kt, k_hi, k_mid, k_lo, scale, FP8, UPCAST, Q_TO_FP32, SPLIT3, SPLIT_IEEE, IEEE,
                             SCALE_AFTER_RELU)
            # Padding heads / rows are zeros, never 0 * inf = NaN from a key.
            y = tl.where(m_ok[:, None], y * wm[:, None], 0.0)
            acc = tl.sum(tl.reshape(y, [BLOCK_S, BLOCK_H, BLOCK_T]), axis=1)
        else:
            q_ptrs = q_ptr + b * qs0 + rs[:, None] * qs1 + rd[None, :] * qs3
            w_ptrs = w_ptr + b * ws0 + rs * ws1
            q_ok = s_ok[:, None] & d_ok[None, :]
            acc = tl.zeros([BLOCK_S, BLOCK_T], dtype=tl.float32)
            for h in range(H):
                qh = tl.load(q_ptrs + h * qs2, mask=q_ok, other=0.0)
                wh = tl.load(w_ptrs + h * ws2, mask=s_ok, other=0.0).to(tl.float32)
                y = _head_scores(qh, kt, k_hi, k_mid, k_lo, scale, FP8, UPCAST, Q_TO_FP32, SPLIT3, SPLIT_IEEE,
                                 IEEE, SCALE_AFTER_RELU)
                acc += y * wh[:, None]
        if HAS_KSCALE:
            ksc = tl.load(ksc_ptr + b * kscs0 + rt * kscs1, mask=t_ok, other=0.0)
            acc = acc * ksc[None, :]
        if not UNDEFINED_OUTSIDE and HAS_BOUNDS:
            acc = tl.where((rt[None, :] < hi[:, None]) & (rt[None, :] >= lo[:, None]), acc, float("-inf"))
        tl.store(o_ptr + b * os0 + rs[:, None] * os1 + rt[None, :] * os2, acc, mask=s_ok[:, None] & t_ok[None, :])

    @triton.jit
    def _split_exact(kflag, qmin):
        """Whether the three-bf16-dot split gives a tile's products exactly: every key part is a normal bf16
        (``|k| >= 2**-102``, so ``lo``'s last bit is above 2**-126) and every product of a q element with a
        part is a normal fp32 (``|q| * |k| >= 2**-102``), and no q row holds an inf (``qmin`` 0: an inf times a
        zero ``mid`` / ``lo`` part is NaN where eager's ``inf * k`` is +-inf).  ``kflag``: the tile's split flag
        (``min(|k|, 1)`` over nonzero keys, in (0, 1]), ``qmin``: the rows' ``_q_stats``."""
        return (kflag >= 2.0 ** -102) & (qmin * kflag >= 2.0 ** -102)

    @triton.jit
    def _q_stats_kernel(q_ptr, qs0, qs1, qs2, qs3, o_ptr, os0, os1, S, H, D, FP8: tl.constexpr,
                        BLOCK: tl.constexpr):
        """``qmin[b, s]`` fp32: 0 where row ``s`` of ``q`` holds an inf (any head), else its smallest nonzero
        ``|q|`` (inf when all are zero or NaN): what ``_split_exact`` checks of q.  One program per row, its
        ``H * D`` elements in chunks of ``BLOCK``."""
        s = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1).to(tl.int64)
        qmin = tl.full([BLOCK], float("inf"), tl.float32)
        for j0 in range(0, H * D, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            x = tl.load(q_ptr + b * qs0 + s * qs1 + (j // D) * qs2 + (j % D) * qs3, mask=j < H * D, other=0.0)
            a = tl.abs(_upcast(x, FP8))
            qmin = tl.minimum(qmin, tl.where(a == float("inf"), 0.0, tl.where(a > 0, a, float("inf"))))
        tl.store(o_ptr + b * os0 + s * os1, tl.min(qmin, 0))

    @triton.jit(do_not_specialize=["S", "T", "short_k"])
    def _index_score_fixup_kernel(
        q_ptr, qs0, qs1, qs2, qs3, k_ptr, ks0, ks1, ks2, w_ptr, ws0, ws1, ws2, e_ptr, es0, es1,
        st_ptr, sts0, sts1, ksc_ptr, kscs0, kscs1, o_ptr, os0, os1, os2,
        ki_ptr, kis0, kis1, kc_ptr, kcs0, kcs1, n_slots, n_scale_slots, page,
        kf_ptr, kfs0, kfs1, kfs2, qm_ptr, qms0, qms1,
        S, T, H, D, scale, short_k,
        SCALE_AFTER_RELU: tl.constexpr, HAS_ENDS: tl.constexpr, HAS_STARTS: tl.constexpr,
        HAS_KSCALE: tl.constexpr, FP8: tl.constexpr, GATHER: tl.constexpr, ZERO_NEGATIVE: tl.constexpr,
        UNDEFINED_OUTSIDE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
        HEADS: tl.constexpr, BLOCK_H: tl.constexpr, FIX_S: tl.constexpr, FIX_T: tl.constexpr, FIX_G: tl.constexpr,
    ):
        """The split's fix-up, launched after ``_index_score_kernel`` (SPLIT3): one program per ``FIX_S`` rows x
        ``FIX_G`` key tiles of ``FIX_T`` (inside the main launch's ``BLOCK_S x BLOCK_T`` tiles, whose split flags
        it reads from ``kf``).  It rescores, with the fp32 FMA dot (eager's ``q.float() @ k``), only the tiles
        where ``_split_exact`` fails and the main launch computed scores; the others are left as written."""
        b = tl.program_id(1).to(tl.int64)
        n_g = tl.cdiv(tl.cdiv(T, FIX_T), FIX_G)
        s1 = (tl.program_id(0) // n_g) * FIX_S
        g0 = (tl.program_id(0) % n_g) * FIX_G
        rs = (s1 + tl.arange(0, FIX_S)).to(tl.int64)
        s_ok = rs < S
        lo, hi = _row_bounds(b, rs, s_ok, e_ptr, es0, es1, st_ptr, sts0, sts1, T, HAS_ENDS, HAS_STARTS)
        hi_max, lo_min = _live_span(lo, hi, s_ok, T, short_k, UNDEFINED_OUTSIDE)
        qmin = tl.min(tl.load(qm_ptr + b * qms0 + rs * qms1, mask=s_ok, other=float("inf")), 0)
        kf_row = kf_ptr + b * kfs0 + (s1 // BLOCK_S) * kfs1
        # the group's tiles at once (one load latency for the common case: nothing to fix)
        t0 = (g0 + tl.arange(0, FIX_G)) * FIX_T
        flags = tl.load(kf_row + (t0 // BLOCK_T) * kfs2, mask=t0 < T, other=1.0)
        need = (t0 < T) & (hi_max > t0) & (lo_min < t0 + FIX_T) & (_split_exact(flags, qmin) == 0)
        if tl.max(need.to(tl.int32), 0) > 0:
            for j in range(FIX_G):
                t1 = (g0 + j) * FIX_T
                if (t1 < T) & (hi_max > t1) & (lo_min < t1 + FIX_T) & \
                        (_split_exact(tl.load(kf_row + (t1 // BLOCK_T) * kfs2, mask=t1 < T, other=1.0), qmin) == 0):
                    # q.float() @ k as one fp32 FMA dot (Q_TO_FP32, IEEE; no split, no upcast)
                    _score_tile(b, s1, t1, lo, hi, kf_row, q_ptr, qs0, qs1, qs2, qs3, k_ptr, ks0, ks1, ks2, w_ptr,
                                ws0, ws1, ws2, ksc_ptr, kscs0, kscs1, o_ptr, os0, os1, os2, ki_ptr, kis0, kis1,
                                kc_ptr, kcs0, kcs1, n_slots, n_scale_slots, page, S, T, H, D, scale,
                                SCALE_AFTER_RELU, HAS_ENDS or HAS_STARTS, HAS_KSCALE, FP8, GATHER, ZERO_NEGATIVE,
                                True, False, False, UNDEFINED_OUTSIDE, True, False, FIX_S, FIX_T, BLOCK_D, HEADS,
                                BLOCK_H)

    @triton.jit(do_not_specialize=["S", "T", "short_k"])  # S, T: never constexpr 1 (T.to() needs a tensor)
    def _index_score_kernel(
        q_ptr, qs0, qs1, qs2, qs3, k_ptr, ks0, ks1, ks2, w_ptr, ws0, ws1, ws2, e_ptr, es0, es1,
        st_ptr, sts0, sts1, ksc_ptr, kscs0, kscs1, o_ptr, os0, os1, os2,
        ki_ptr, kis0, kis1, kc_ptr, kcs0, kcs1, n_slots, n_scale_slots, page,
        kf_ptr, kfs0, kfs1, kfs2, qm_ptr, qms0, qms1,
        S, T, H, D, scale, short_k,
        SCALE_AFTER_RELU: tl.constexpr, HAS_ENDS: tl.constexpr, HAS_STARTS: tl.constexpr,
        HAS_KSCALE: tl.constexpr, FP8: tl.constexpr, GATHER: tl.constexpr, ZERO_NEGATIVE: tl.constexpr,
        Q_TO_FP32: tl.constexpr, SPLIT3: tl.constexpr, SPLIT_IEEE: tl.constexpr,
        UNDEFINED_OUTSIDE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
        HEADS: tl.constexpr = False, BLOCK_H: tl.constexpr = 1,
    ):
        """One (row tile, key tile) of one batch; key tiles of a row tile are adjacent programs.

        Rows layout (HEADS False): one ``[BLOCK_S, D] x [D, BLOCK_T]`` dot per head, accumulated.  Heads layout
        (HEADS, for few query rows: decode): the ``BLOCK_S x BLOCK_H`` (query row, head) pairs are the rows of
        one ``[BLOCK_S * BLOCK_H, D] x [D, BLOCK_T]`` dot, reduced over heads after the relu and the weight.

        With SPLIT3 each program writes its tile's split flag to ``kf [B, n_s, n_t]`` (1 for a skipped tile), for
        ``_index_score_fixup_kernel``, which rescores the tiles where the split is not exact: the hot loop
        stays branch-free and no host sync is needed (CUDA-graph safe)."""
        pid = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        n_t = tl.cdiv(T, BLOCK_T)
        pid_s = pid // n_t
        pid_t = pid % n_t
        s0 = pid_s * BLOCK_S
        t0 = pid_t * BLOCK_T
        rs = (s0 + tl.arange(0, BLOCK_S)).to(tl.int64)
        s_ok = rs < S
        lo, hi = _row_bounds(b, rs, s_ok, e_ptr, es0, es1, st_ptr, sts0, sts1, T, HAS_ENDS, HAS_STARTS)
        hi_max, lo_min = _live_span(lo, hi, s_ok, T, short_k, UNDEFINED_OUTSIDE)
        skip = hi_max <= t0
        if HAS_STARTS:
            skip = skip | (lo_min >= t0 + BLOCK_T)
        kf_ptrs = kf_ptr + b * kfs0 + pid_s * kfs1 + pid_t * kfs2
        if skip:
            if not UNDEFINED_OUTSIDE:
                # Every position of the tile is outside its row's range: eager's masked_fill writes -inf.
                rt = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
                tl.store(o_ptr + b * os0 + rs[:, None] * os1 + rt[None, :] * os2,
                         tl.full([BLOCK_S, BLOCK_T], float("-inf"), tl.float32),
                         mask=s_ok[:, None] & (rt < T)[None, :])
            if SPLIT3:
                tl.store(kf_ptrs, 1.0)  # (read by the fix-up launch, which skips this tile too)
        else:
            _score_tile(b, s0, t0, lo, hi, kf_ptrs, q_ptr, qs0, qs1, qs2, qs3, k_ptr, ks0, ks1, ks2, w_ptr,
                        ws0, ws1, ws2, ksc_ptr, kscs0, kscs1, o_ptr, os0, os1, os2, ki_ptr, kis0, kis1, kc_ptr,
                        kcs0, kcs1, n_slots, n_scale_slots, page, S, T, H, D, scale, SCALE_AFTER_RELU,
                        HAS_ENDS or HAS_STARTS, HAS_KSCALE, FP8, GATHER, ZERO_NEGATIVE, Q_TO_FP32, SPLIT3,
                        SPLIT_IEEE, UNDEFINED_OUTSIDE, IEEE, UPCAST, BLOCK_S, BLOCK_T, BLOCK_D, HEADS, BLOCK_H)


HEADS_MAX_S = 8  # at most this many query rows per batch: the heads layout (decode, MTP); see _default_config
HEADS_MAX_H = 128  # most heads (padded to a power of two) one heads-layout program holds


def _use_heads(s, h, layout):
    if layout not in (None, "rows", "heads"):
        raise ValueError(f"index_score: `layout` must be None, 'rows' or 'heads', got {layout!r}")
    if layout is None:
        return s <= HEADS_MAX_S and next_pow2(h) <= HEADS_MAX_H
    return layout == "heads"


def _default_config(q, t, fp32_dot=False, split3=False, heads=False):
    """(BLOCK_S, BLOCK_T, num_warps, num_stages).  Rows layout: the [BLOCK_S, BLOCK_T] fp32 accumulator and one
    head's dot result live in registers together: 64 x 256 with 8 warps is 64 + 64 registers per thread.  A wide
    key tile makes each q row tile be read T / BLOCK_T times (from L2), so wide T tiles are preferred.

    Heads layout (few query rows, as in decode, where a rows tile of 64 query rows would hold one real row):
    BLOCK_S query rows x BLOCK_H heads (at least 16 dot rows, at most 64 unless the heads alone are more) in
    one dot per key tile; the key tiles stream from HBM, so the tile is sized for bytes in flight."""
    if heads:
        bh = next_pow2(q.shape[2])
        bs = max(1, min(next_pow2(q.shape[1]), 64 // bh)) if bh < 64 else 1
        bs = max(bs, cdiv(16, bh))
        if q.dtype == torch.float32 or fp32_dot:
            return bs, 32, 4, 2
        return bs, 128, 4, 3
    if q.dtype == torch.float32 or fp32_dot:
        return 32, 64, 4, 2
    if split3:  # three bf16 k tiles live across the head loop; H200 sweep (bench/NOTES.md): 128 x 128, 8 warps
        return 128, 128, 8, 2
    return 64, 256 if t >= 256 else 128, 8, 3


def q_row_min(q):
    """fp32 ``[B, S]``: each q row's smallest nonzero ``|q|`` over heads and dims, 0 for a row holding an inf
    (``_q_stats_kernel``; the split's check of q)."""
    b, s, h, d = q.shape
    qmin = torch.empty(b, s, dtype=torch.float32, device=q.device)
    _q_stats_kernel[(s, b)](q, *q.stride(), qmin, *qmin.stride(), s, h, d, FP8=q.dtype == torch.float8_e4m3fn,
                            BLOCK=min(2048, next_pow2(h * d)), num_warps=4)
    return qmin


def index_score_triton(q, k, weights, scale=1.0, scale_after_relu=False, row_ends=None, row_starts=None,
                       short_k=-1, outside_undefined=False, k_scale=None, k_slots=None, k_cache_scale=None,
                       k_block_size=0, k_zero_negative=False,
                       block_s=None, block_t=None, num_warps=None, num_stages=None, split3=None, layout=None,
                       fixup=True):
    """Run the Triton kernel (the op's CUDA path).  The block sizes and launch options override
    ``_default_config`` (tests shrink them, tuning sweeps them); ``split3`` (default: where it applies) picks
    the three-bf16-dot form of fp32-key dots for bf16 / e4m3 ``q`` (False: one fp32 FMA dot); ``layout``
    ``"rows"`` or ``"heads"`` forces the kernel's tile layout (default: heads for at most ``HEADS_MAX_S``
    query rows, see ``_index_score_kernel``; there ``block_s`` query rows are capped so a program holds at most
    64 (query row, head) pairs, as ``_default_config`` sizes them: a 32-row override with 16 fp32 heads needed
    279040 bytes of shared memory on an H200, over its 232448); ``fixup=False`` leaves out the split's fix-up launch (only to show
    what it fixes: the result may then differ from eager, see ``_split_exact``)."""
    if triton is None:
        raise RuntimeError("index_score: triton is not installed")
    by_metadata(_check_args, q, k, weights, scale, row_ends, row_starts, short_k, outside_undefined, k_scale, k_slots,
                k_cache_scale, k_block_size)
    b, s, h, d = q.shape
    gather = k_slots is not None
    t = _logical_k_shape(k, k_slots)[1]
    # torch.empty: with outside_undefined, positions outside the ranges and short rows are never written.
    out = torch.empty(b, s, t, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    q_to_fp32 = gather or (k.dtype == torch.float32 and q.dtype != torch.float32)
    # bf16 / e4m3 q against fp32 keys: three exact bf16 dots (_split3) rather than one fp32 FMA dot
    if split3 is None:
        split3 = q_to_fp32 and q.dtype in (torch.bfloat16, torch.float8_e4m3fn)
    elif split3 and not (q_to_fp32 and q.dtype in (torch.bfloat16, torch.float8_e4m3fn)):
        raise ValueError("index_score: split3 needs bf16 / e4m3 q with float32 (or gathered) keys")
    heads = _use_heads(s, h, layout)
    ds, dt, dw, dst = _default_config(q, t, fp32_dot=q_to_fp32 and not split3, split3=split3, heads=heads)
    block_s, block_t = block_s or ds, block_t or dt
    if heads:  # BLOCK_S x BLOCK_H (query row, head) pairs: at most 64 (or the heads alone), at least 16 (tl.dot)
        bh = next_pow2(h)
        block_s = max(min(block_s, max(1, 64 // bh)), cdiv(16, bh))
    if gather:  # the cache as uint8 [P, B, D] (B = 1 for a [P, D] cache), its scales [P, B]
        page = k_block_size if k.dim() == 3 else 1
        n_slots = k.shape[0] * page
        k = k.view(torch.uint8)
        k = k if k.dim() == 3 else k.unsqueeze(1)
        kc = k_cache_scale if k_cache_scale.dim() == 3 else k_cache_scale.unsqueeze(1)
        ki = k_slots.expand(b, t)
        gather_args = (ki, ki.stride(0), ki.stride(1), kc, kc.stride(0), kc.stride(1), n_slots,
                       kc.shape[0] * page, page)
        k_strides = (k.stride(0), k.stride(1), k.stride(2))
    else:
        k = k.expand(b, t, d)
        gather_args = (out, 0, 0, out, 0, 0, 1, 1, 1)
        k_strides = k.stride()
    e = row_ends if row_ends is not None else out
    st = row_starts if row_starts is not None else out
    ksc = k_scale.expand(b, t) if k_scale is not None else out
    # Triton 3.9's interpreter computes a bf16 tl.dot wrongly (values ~1e10 off): there the bf16 tiles are
    # upcast first, which is exact (bf16 -> fp32) and gives the same fp32 products.
    fp8 = q.dtype == torch.float8_e4m3fn
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    upcast = q.dtype in (torch.bfloat16, torch.float8_e4m3fn) and interpret
    n_s, n_t = cdiv(s, block_s), cdiv(t, block_t)
    grid = (n_s * n_t, b)
    block_d = max(32 if fp8 else 16, next_pow2(d))  # FP8 tl.dot: K >= 32
    block_h = next_pow2(h) if heads else 1
    if split3:  # the split's flags: per tile of keys, and q's rows (see _split_exact)
        kf = torch.empty(b, n_s, n_t, dtype=torch.float32, device=q.device)
        qmin = q_row_min(q)
        flag_args = (kf, *kf.stride(), qmin, *qmin.stride())
    else:
        flag_args = (out, 0, 0, 0, out, 0, 0)
    args = (q, *q.stride(), k, *k_strides, weights, *weights.stride(), e, e.stride(0), e.stride(1),
            st, st.stride(0), st.stride(1), ksc, ksc.stride(0), ksc.stride(1), out, *out.stride(), *gather_args,
            *flag_args, s, t, h, d, float(scale), short_k if outside_undefined else -1)
    consts = dict(SCALE_AFTER_RELU=bool(scale_after_relu), HAS_ENDS=row_ends is not None,
                  HAS_STARTS=row_starts is not None, HAS_KSCALE=k_scale is not None, FP8=fp8, GATHER=gather,
                  ZERO_NEGATIVE=bool(k_zero_negative), UNDEFINED_OUTSIDE=bool(outside_undefined),
                  BLOCK_S=block_s, BLOCK_T=block_t, BLOCK_D=block_d, HEADS=heads, BLOCK_H=block_h)
    _index_score_kernel[grid](
        *args, **consts, Q_TO_FP32=q_to_fp32, SPLIT3=split3, SPLIT_IEEE=interpret,
        IEEE=q.dtype == torch.float32 or upcast or q_to_fp32, UPCAST=upcast and not q_to_fp32,
        num_warps=num_warps or dw, num_stages=num_stages or dst)
    if split3 and fixup:  # the tiles where the split is not exact, again with the fp32 FMA dot
        fs, ft, fw, fst = _default_config(q, t, fp32_dot=True, heads=heads)
        # rows: a fine grid, so flagged tiles spread over the GPU; heads (decode: many key tiles, rarely
        # flagged): FIX_G key tiles a program, so the launch that fixes nothing is short
        fs, ft = (block_s, min(ft, block_t)) if heads else (min(fs, block_s), min(ft, block_t))
        fg = 16 if heads else 2
        _index_score_fixup_kernel[(cdiv(s, fs) * cdiv(cdiv(t, ft), fg), b)](
            *args, **consts, FIX_S=fs, FIX_T=ft, FIX_G=fg, num_warps=fw, num_stages=fst)
    return out


@fused_op(OP_NAME)
def index_score(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    scale: float,
    scale_after_relu: bool,
    row_ends: Optional[torch.Tensor],
    row_starts: Optional[torch.Tensor] = None,
    short_k: int = -1,
    outside_undefined: bool = False,
    k_scale: Optional[torch.Tensor] = None,
    k_slots: Optional[torch.Tensor] = None,
    k_cache_scale: Optional[torch.Tensor] = None,
    k_block_size: int = 0,
    k_zero_negative: bool = False,
    k_cache_scale_bytes: bool = False,
) -> torch.Tensor:
    """Fused ``sum_h weights * relu(q . k * scale)`` over heads, as fp32 ``[B, S, T]``.

    Args:
        q: ``[B, S, H, D]`` float32 / float16 / bfloat16 / float8_e4m3fn queries (any strides).
        k: ``[B, T, D]`` (or ``[1, T, D]``) keys, the dtype of ``q``, or float32 with any ``q`` (then ``q``
            is upcast and the dots are fp32: eager's ``q.float() @ k``).
        weights: ``[B, S, H]`` float per-head weights (any float dtype above).
        scale: applied to each per-head dot product, before the relu (``scale_after_relu=False``, as
            transformers does) or after it.
        row_ends: optional int32/int64 ``[B, S]``: positions ``t >= row_ends[b, s]`` are outside the row.
        row_starts: optional int32/int64 ``[B, S]``: positions ``t < row_starts[b, s]`` are outside the row.
        short_k: with ``outside_undefined``, rows whose clamped in-range length is ``<= short_k`` are not
            computed (``-1``: none).  Must be ``-1`` (or negative) otherwise.
        outside_undefined: False: outside positions are ``-inf``.  True: they (and short rows) are left
            unwritten, for a fused consumer that never reads them (see the module docstring).
        k_scale: optional float32 ``[B, T]`` (or ``[1, T]``) per-token k scale multiplying the head sum
            (FP8 k, DeepSeek's ``fp8_index``).
        k_slots: optional int32/int64 ``[B, T]`` (or ``[1, T]``): the keys are gathered from an FP8 cache.
            ``k`` is then that cache, uint8 or float8_e4m3fn ``[P, D]`` (``k_block_size`` 0) or ``[P, B', D]``
            (pages of ``B = k_block_size <= B'`` tokens, ``slot = page * B + pos`` read as ``k[slot // B,
            slot % B]``: a page view may hold more rows than tokens), and key ``t`` is the fp32 row
            ``e4m3(k[slot]) * k_cache_scale[slot]``, dequantized in registers (no copy is written): eager's
            ``gather_dequant`` (see that op for the addressing).  The dots are then fp32 (eager's
            ``q.float() @ k``).
        k_cache_scale: with ``k_slots``, the per-token scale table, float ``[P, 1]`` or ``[P, B'', 1]``
            (``B'' >= k_block_size``), indexed like ``k`` (each table within its own pages).
        k_block_size: with ``k_slots`` on a paged cache, the page size ``B``.
        k_zero_negative: with ``k_slots``, a negative slot (vLLM's padding ``-1``) is a zero key; otherwise
            negative slots wrap once as eager indexing does.  A slot outside the cache raises IndexError on
            the CPU path (as eager) and gives a zero key on CUDA (never read).
        k_cache_scale_bytes: ``k_cache_scale`` is uint8 ``[P, (B'',) 4]``, the bytes of the fp32 scales (the
            inline page layout), viewed as float32 by the op (``gather_dequant``'s ``scale_bytes``).

    Returns:
        float32 ``[B, S, T]``.

    Raises:
        ValueError / TypeError naming the argument: bad rank, dtype, device or shape, non-finite scale,
        ``short_k >= 0`` without ``outside_undefined``.
    """
    k_cache_scale = scales_from_bytes(k_cache_scale, k_cache_scale_bytes, "index_score: `k_cache_scale`")
    gather = (k_slots, k_cache_scale, k_block_size, k_zero_negative)
    if q.device.type != "cuda":  # (on CUDA, the *_triton function checks them)
        _check_args(q, k, weights, scale, row_ends, row_starts, short_k, outside_undefined, k_scale, *gather[:3])
        return index_score_reference(q, k, weights, scale, scale_after_relu, row_ends, row_starts, short_k,
                                     outside_undefined, k_scale, *gather)
    out = index_score_triton(q, k, weights, scale, scale_after_relu, row_ends, row_starts, short_k,
                             outside_undefined, k_scale, *gather)
    if VERIFY:
        if k_slots is not None:  # eager's keys; a slot outside the cache raises here (verify mode's contract)
            k = gathered_k(k, *gather)
        ref = index_score_reference(q, k, weights, scale, scale_after_relu, row_ends, row_starts, short_k,
                                    outside_undefined, k_scale)
        cmp = out
        if outside_undefined:
            cmp = torch.where(defined_mask(out.shape[-1], row_starts, row_ends, short_k, out.new_empty(out.shape[:-1])), out, ref)
        why = score_mismatch(cmp, ref, tolerance(q, k, weights, scale, row_ends, row_starts, k_scale))
        if why is not None:
            raise AssertionError(f"dsa_inductor verify: rule index_score ({OP_NAME}) differs from eager: {why}")
    return out


@index_score.register_fake
def _index_score_fake(q, k, weights, scale, scale_after_relu, row_ends, row_starts=None, short_k=-1,
                      outside_undefined=False, k_scale=None, k_slots=None, k_cache_scale=None, k_block_size=0,
                      k_zero_negative=False, k_cache_scale_bytes=False):
    # Shapes only (the launch arithmetic on sizes would specialize dynamic shapes).
    k_cache_scale = scales_from_bytes(k_cache_scale, k_cache_scale_bytes, "index_score: `k_cache_scale`")
    _check_args(q, k, weights, scale, row_ends, row_starts, short_k, outside_undefined, k_scale, k_slots,
                k_cache_scale, k_block_size)
    return q.new_empty(q.shape[0], q.shape[1], _logical_k_shape(k, k_slots)[1], dtype=torch.float32)
