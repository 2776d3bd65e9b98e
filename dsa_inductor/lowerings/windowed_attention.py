"""``dsa_inductor::windowed_attention``: attention whose softmax sees only a per-row key window.

Idiom (DeepSeek-V4 sliding-window attention over the last 128 keys; DSA prefill with per-query
``[ks, ke)`` key offsets from ``cu_seqlens``; any causal attention written with an ``arange`` mask)::

    scores = (q @ k.transpose(-1, -2)) * scale            # or / sqrt(d), einsum; batch and head dims
    scores = scores.masked_fill(~keep, float("-inf"))      # keep: row_starts <= kv < row_ends (an arange test)
    out = torch.softmax(scores, dim=-1) @ v                # or softmax(..., dtype=float32).to(v.dtype)

The rule ``windowed_softmax`` turns the masked softmax into ``dsa_inductor::windowed_softmax``, which must
still write the dense ``[..., S, T]`` probabilities (a 128-key window over 8192 x 8192 fp32 writes 256 MiB,
80 us on an H100).  When the probabilities only feed ``@ v`` and the scores come from ``q @ k^T``, the rule
``windowed_attention`` fuses the whole chain into this op, which writes neither the scores nor the
probabilities: only ``[..., S, Dv]``.

Semantics (the matched eager graph, rounding points included)::

    s = (q @ k^T)                          # fp32 accumulation, rounded to q.dtype (the matmul's result)
    s = s.to(scores_dtype) * scale         # computed in fp32, rounded to scores_dtype (q.dtype or float32)
    p = softmax(where(keep, s, -inf), dim=-1, dtype=float32).to(v.dtype)
    out = p @ v                            # fp32 accumulation, rounded to v.dtype

with ``keep[..., i, j] = row_starts[..., i] <= j < row_ends[..., i]`` (either bound optional).  With ``sinks``
(DeepSeek-V4's per-head attention sink) the softmax is ``softmax(cat([s, sink], -1))[..., :-1]`` in fp32: the
kernel starts each row's online softmax from the sink (running max ``sink``, sum 1) instead of (-inf, 0), so a
row with no key in its window is 0 rather than NaN, as eager.  With ``tail`` (DeepSeek-V4's compressed layers,
whose keys are the sliding window's followed by the compressed ones) the bounds apply to keys ``[0, tail)``, and
keys ``[tail, T)`` are kept by their own ``tail_starts <= j - tail < tail_ends`` and take ``tail_bias`` added to
their scaled scores (rounded to ``scores_dtype``); the kernel walks the window's span, then the tail's.  The batch
dims of ``q``, ``k``, ``v`` and the row bounds broadcast as ``torch.matmul`` and ``where`` do; ``scale``
multiplies (a ``/ c`` in the graph arrives as ``* (1 / c)``, which may differ from eager's division in the
last bit of the scores).  A row with no key in its window (or whose kept scores are all ``-inf``) is NaN,
as eager's softmax over all ``-inf``; ``T == 0`` gives zeros, as eager's empty matmul.

CUDA path (``windowed_attention_triton``), FlashAttention-2's forward (Dao, 2023): one program per
(block of ``BLOCK_M`` query rows, batch entry), a 1-d grid; each program loads its query rows once and
walks only the keys ``[min row_start, max row_end)`` of its rows in ``BLOCK_N`` tiles (a sliding window of 128 reads
``128 + BLOCK_M - 1`` keys per block, not T), masking each element to its own row's window; ``q k^T`` and
``P V`` are ``tl.dot`` on tensor cores with an online softmax in fp32 (``exp2``).  The rounding of the
matched graph is reproduced on the scores (to ``q.dtype``, then to ``scores_dtype`` after the scale) and on
the unnormalized weights (to ``v.dtype`` before ``P V``; eager rounds the normalized ones, a difference within
``dsa_inductor.testing.ATTENTION_TOLERANCES``).  Keys outside the block's span are never read; within it,
keys outside a row's window are read for their neighbours but weigh exactly 0 in that row.  Non-finite
values in ``k`` or ``v`` outside a row's window are where eager and the kernel differ: eager multiplies
them by 0 in the dense ``p @ v`` (NaN in every row for an inf or NaN in ``v``), the kernel never reads them
or reads them for neighbouring rows only.

CPU path: plain torch, the dense eager computation above (Inductor calls the op as an extern kernel).
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch

from ..testing import windowed_attention_mismatch
from .host import broadcast_shapes, by_metadata, cdiv, refuse_miscompiled_tile
from .registry import fused_op
from .windowed_softmax import window_keep

try:  # triton is optional on CPU-only installs; the CPU path never needs it.
    import triton
    import triton.language as tl

    from .sparse_attention import _dims, _last_contiguous, _load_q, _qk_tile, _up
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None

OP_NAME = "dsa_inductor::windowed_attention"
VERIFY = False  # set by register_dsa_passes(verify=True): check each CUDA call against the plain-torch path
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# Tunables (bf16/fp16 inputs, fp32 inputs): query rows and keys per tile, warps, pipeline stages.  From
# bench/tune_windowed_attention.py on an H200 (torch 2.11, triton 3.6; 8192 x 128, window 128, GPU time): fp32
# with "ieee" dots 64 us (64/32/4/2: 1940 us, the FMA dot's registers spill).  16-bit: 64/32/4/3 8.0 us, the
# fastest of the 28 allowed configs in session 10's sweep (64/64/8/3 8.8, 32/64/4/3 9.1); 64/64/4/3 had measured
# 7.8 us (session 7), but Triton 3.6 miscompiles that tile (see host.miscompiled_tile).
CONFIG_16 = dict(block_m=64, block_n=32, num_warps=4, num_stages=3)
CONFIG_32 = dict(block_m=32, block_n=32, num_warps=4, num_stages=2)
# Head dims past 256 (DeepSeek-V4: D = Dv = 512): the [BLOCK_M, Dv] fp32 accumulator and the staged k / v tiles
# outgrow 4 warps and 3 stages.  bench/tune_windowed_attention.py --v4 on an H100 (torch 2.11, triton 3.6; 64 heads,
# T 4096, window 128, one shared K = V head, GPU time): 64/32/8/2 756.8 us, 32/32/4/2 791.8, 16/32/4/2 933.9,
# 32/32/8/2 1152.8; 64-row tiles with 4 warps 2369-2615 (the accumulator spills).
CONFIG_WIDE = dict(block_m=64, block_n=32, num_warps=8, num_stages=2)
# fp32 dots: "ieee" as eager's fp32 matmul without TF32 ("tf32x3" is faster and close to fp32, not equal)
FP32_PRECISION = "ieee"


def _check_args(q, k, v, row_starts, row_ends, scale, scores_dtype, sinks=None, tail=None, tail_starts=None,
                tail_ends=None, tail_bias=None):
    """Raise ValueError/TypeError naming the offending argument; returns the output shape."""
    name = "windowed_attention"
    for arg, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() < 2:
            raise ValueError(f"{name}: `{arg}` must be a tensor with at least 2 dims, got {getattr(t, 'shape', t)}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name}: `{arg}` must be float32, float16 or bfloat16, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: `{arg}` is on {t.device}, `q` on {q.device}")
    if k.dtype != q.dtype:
        raise TypeError(f"{name}: `k` must have the dtype of `q` ({q.dtype}), got {k.dtype}")
    if _known_differ(k.shape[-1], q.shape[-1]):
        raise ValueError(f"{name}: `k` has head dim {k.shape[-1]}, `q` has {q.shape[-1]}")
    if _known_differ(v.shape[-2], k.shape[-2]):
        raise ValueError(f"{name}: `v` has {v.shape[-2]} keys, `k` has {k.shape[-2]}")
    shape = (*q.shape[:-1],)  # the rows [*batch, S], broadcast with every other argument in turn
    if tail is None and any(x is not None for x in (tail_starts, tail_ends, tail_bias)):
        raise ValueError(f"{name}: `tail_starts`, `tail_ends` and `tail_bias` need `tail` (where the tail keys start)")
    if tail is not None and (isinstance(tail, bool) or not isinstance(tail, (int, torch.SymInt)) or (
            isinstance(tail, int) and isinstance(k.shape[-2], int) and not 0 <= tail <= k.shape[-2])):
        raise ValueError(f"{name}: `tail` must be an int in [0, {k.shape[-2]}] (the number of keys), got {tail!r}")
    if tail_bias is not None:
        if tail_bias.dtype not in _FLOATS or tail_bias.dim() < 2:
            raise TypeError(f"{name}: `tail_bias` must be a float32, float16 or bfloat16 tensor [..., S, T - tail], "
                            f"got {tail_bias.dtype} {tuple(tail_bias.shape)}")
        if _known_differ(tail_bias.shape[-1], k.shape[-2] - tail):
            raise ValueError(f"{name}: `tail_bias` has {tail_bias.shape[-1]} keys, the tail {k.shape[-2] - tail}")
    for arg, own in (("k", (*k.shape[:-2], 1)), ("v", (*v.shape[:-2], 1)), ("row_starts", row_starts),
                     ("row_ends", row_ends), ("sinks", sinks), ("tail_starts", tail_starts),
                     ("tail_ends", tail_ends), ("tail_bias", None if tail_bias is None else tuple(tail_bias.shape[:-1]))):
        if own is None:
            continue
        if isinstance(own, torch.Tensor):
            if arg == "sinks" and own.dtype not in _FLOATS:
                raise TypeError(f"{name}: `sinks` must be a float32, float16 or bfloat16 tensor, got {own.dtype}")
            if arg != "sinks" and own.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"{name}: `{arg}` must be an int32 or int64 tensor, got {own.dtype}")
            if own.device != q.device:
                raise ValueError(f"{name}: `{arg}` is on {own.device}, `q` on {q.device}")
            own = tuple(own.shape)
        try:
            shape = tuple(broadcast_shapes(shape, own))
        except RuntimeError:
            raise ValueError(f"{name}: `{arg}` ({'batch dims' if arg in ('k', 'v') else 'shape'} {own}) does "
                             f"not broadcast with the rows {shape} of `q`") from None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{name}: `scale` must be a finite number, got {scale!r}")
    if scores_dtype not in (q.dtype, torch.float32):
        raise TypeError(f"{name}: `scores_dtype` must be q's dtype ({q.dtype}) or torch.float32, got {scores_dtype}")
    return (*shape, v.shape[-1])


def _known_differ(a, b) -> bool:
    """Sizes known to differ (a symbolic size under tracing is checked again on the real call)."""
    return isinstance(a, int) and isinstance(b, int) and a != b


def windowed_attention_reference(q, k, v, row_starts=None, row_ends=None, scale=1.0, scores_dtype=None,
                                 sinks=None, tail=None, tail_starts=None, tail_ends=None, tail_bias=None):
    """Plain-torch definition of the op (its CPU path, and the oracle of the kernel tests): the dense eager
    computation, ``[..., S, T]`` scores and probabilities included; with ``sinks``, DeepSeek-V4's (and
    gpt-oss's) ``softmax(cat([scores, sink], -1))[..., :-1]``."""
    scores_dtype = scores_dtype or q.dtype
    s = torch.matmul(q, k.transpose(-1, -2)).to(scores_dtype) * scale
    t = s.shape[-1]
    if tail is None:
        keep = window_keep(t, row_starts, row_ends, device=q.device)
    else:  # the window over [0, tail), the tail's own bounds (relative to it) and additive mask over [tail, T)
        head = window_keep(tail, row_starts, row_ends, device=q.device)
        rest = window_keep(t - tail, tail_starts, tail_ends, device=q.device)
        head = torch.ones(tail, dtype=torch.bool, device=q.device) if head is None else head
        rest = torch.ones(t - tail, dtype=torch.bool, device=q.device) if rest is None else rest
        shape = torch.broadcast_shapes(head.shape[:-1], rest.shape[:-1])
        keep = torch.cat([head.expand(*shape, tail), rest.expand(*shape, t - tail)], dim=-1)
        if tail_bias is not None:
            rows = torch.broadcast_shapes(s.shape[:-1], tail_bias.shape[:-1])
            zeros = tail_bias.new_zeros(()).expand(*rows, tail)
            s = (s + torch.cat([zeros, tail_bias.expand(*rows, t - tail)], dim=-1)).to(scores_dtype)
    if keep is not None:
        s = torch.where(keep, s, torch.tensor(float("-inf"), dtype=s.dtype, device=s.device))
    if sinks is None:
        p = torch.softmax(s, dim=-1, dtype=torch.float32)
    else:
        shape = torch.broadcast_shapes(s.shape[:-1], sinks.shape)
        s = torch.cat([s.float().expand(*shape, s.shape[-1]), sinks.float().expand(shape)[..., None]], dim=-1)
        p = torch.softmax(s, dim=-1)[..., :-1]
    return torch.matmul(p.to(v.dtype), v)


def _zh_strides(t, batch, last):
    """``(tensor, strides)``: ``t`` broadcast to ``(*batch, *last)`` read as ``[Z, H, *last]`` (H the last batch
    dim, Z the others merged), by strides alone (no view is made: each torch call costs host time on every
    op call).  A broadcast dim has stride 0; when the merged dims' strides do not line up, ``t`` is copied."""
    full = (*batch, *last)
    shape, stride = tuple(t.shape), tuple(t.stride())
    pad = len(full) - len(shape)
    st = [0] * pad + [0 if n == 1 else x for n, x in zip(shape, stride)]
    nb = len(batch)
    h = st[nb - 1] if nb else 0
    z, inner = 0, None  # Z's stride: its innermost dim of size > 1; outer ones must follow on from it
    for i in range(nb - 2, -1, -1):
        if full[i] == 1:
            continue
        if inner is None:
            z, inner = st[i], i
        elif st[i] != st[inner] * full[inner]:
            t = t.expand(full).contiguous()
            return _zh_strides(t, batch, last)
        else:
            inner = i
    return t, (z, h, *st[nb:])


if triton is not None:

    @triton.jit
    def _row_window(lo_ptr, hi_ptr, rows, rmask, base, n, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr):
        """Each row's kept keys ``[base + lo, base + hi)`` of a segment of ``n`` keys starting at ``base``
        (bounds relative to the segment, clamped to it), and the block's span; rows past S and empty windows
        widen nothing."""
        lo = tl.zeros((rows.shape[0],), tl.int32)
        hi = tl.zeros((rows.shape[0],), tl.int32) + n
        if HAS_LO:
            lo = tl.minimum(tl.maximum(tl.load(lo_ptr, mask=rmask, other=0), 0), n).to(tl.int32)
        if HAS_HI:
            hi = tl.minimum(tl.maximum(tl.load(hi_ptr, mask=rmask, other=0), 0), n).to(tl.int32)
        counts = rmask & (lo < hi)
        lo = tl.where(counts, lo + base, base + n)
        hi = tl.where(counts, hi + base, base)
        return lo, hi, tl.min(lo, 0), tl.max(hi, 0)

    @triton.jit
    def _attend_span(q_a, q_b, k_base, ks_t, v_base, vs_t, vs_d, lo, hi, span_lo, span_hi, scale,
                     bias_base, bs_s, bs_t, bias_from, rows, m_i, l_i, acc,
                     da, db, dv, D: tl.constexpr, DB: tl.constexpr, DV: tl.constexpr, HAS_BIAS: tl.constexpr,
                     MM_DTYPE: tl.constexpr, SCORES_DTYPE: tl.constexpr, ROUND: tl.constexpr,
                     QK_PREC: tl.constexpr, PV_PREC: tl.constexpr, INTERPRETED: tl.constexpr,
                     BLOCK_N: tl.constexpr):
        """The online softmax over keys ``[span_lo, span_hi)`` in BLOCK_N tiles, each row keeping ``[lo, hi)``;
        with HAS_BIAS, ``bias[row, key - bias_from]`` is added to the scaled scores (in their dtype)."""
        for start in range(span_lo, span_hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            cmask = cols < span_hi  # never past the block's span (span_hi <= T)
            s, _ = _qk_tile(q_a, q_b, k_base + cols.to(tl.int64) * ks_t, cmask, da, db, D, DB, QK_PREC,
                            INTERPRETED)
            keep = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
            if ROUND:  # the matched graph's rounding: matmul result, then the scaled scores
                s = _to(s, MM_DTYPE, INTERPRETED).to(tl.float32) * scale
                s = _to(s, SCORES_DTYPE, INTERPRETED).to(tl.float32)
            else:
                s = s * scale
            if HAS_BIAS:  # the additive mask of this segment, read only where the window keeps the key
                b = tl.load(bias_base + rows[:, None] * bs_s + (cols - bias_from)[None, :].to(tl.int64) * bs_t,
                            mask=keep, other=0.0).to(tl.float32)
                s = s + b
                if ROUND:
                    s = _to(s, SCORES_DTYPE, INTERPRETED).to(tl.float32)
            s = tl.where(keep, s * 1.4426950408889634, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no finite score yet: weights exp2(-inf) = 0
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = tl.load(v_base + cols[:, None].to(tl.int64) * vs_t + dv[None, :] * vs_d,
                         mask=cmask[:, None] & (dv[None, :] < DV), other=0.0)  # [BLOCK_N, BLOCK_DV]
            pv = _up(_to(p, vt.dtype, INTERPRETED), INTERPRETED)  # the weights rounded to v's dtype
            acc = tl.dot(pv, _up(vt, INTERPRETED), acc * alpha[:, None], input_precision=PV_PREC)
            m_i = m_new
        return m_i, l_i, acc

    @triton.jit(do_not_specialize=["S", "T", "TAIL"])
    def _windowed_attention_kernel(
        q_ptr, qs_z, qs_h, qs_s,
        k_ptr, ks_z, ks_h, ks_t,
        v_ptr, vs_z, vs_h, vs_t, vs_d,
        st_ptr, sts_z, sts_h, sts_s,
        en_ptr, ens_z, ens_h, ens_s,
        sk_ptr, sks_z, sks_h, sks_s,
        ts_ptr, tss_z, tss_h, tss_s,
        te_ptr, tes_z, tes_h, tes_s,
        tb_ptr, tbs_z, tbs_h, tbs_s, tbs_t,
        o_ptr, os_z, os_h, os_s,
        S, T, TAIL, H, scale,
        D: tl.constexpr, DV: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, BLOCK_DV: tl.constexpr,
        HAS_STARTS: tl.constexpr, HAS_ENDS: tl.constexpr, HAS_SINK: tl.constexpr,
        HAS_TAIL: tl.constexpr, HAS_TAIL_STARTS: tl.constexpr, HAS_TAIL_ENDS: tl.constexpr, HAS_TAIL_BIAS: tl.constexpr,
        MM_DTYPE: tl.constexpr, SCORES_DTYPE: tl.constexpr, ROUND: tl.constexpr,
        QK_PREC: tl.constexpr, PV_PREC: tl.constexpr, INTERPRETED: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """One program per (BLOCK_M query rows, batch entry): FlashAttention-2 over the block's key span (keys
        ``[0, TAIL)``), then, with HAS_TAIL, over its span of the tail segment ``[TAIL, T)``."""
        # A 1-d grid, the row blocks of one batch entry consecutive (the order of a (row blocks, batch) grid,
        # without the 65535 limit of a second grid dim).
        pid = tl.program_id(0).to(tl.int64)
        n_m = tl.cdiv(S, BLOCK_M)
        zh = pid // n_m
        z = zh // H
        h = zh % H
        rows = (pid % n_m) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < S
        lo, hi, span_lo, span_hi = _row_window(st_ptr + z * sts_z + h * sts_h + rows * sts_s,
                                               en_ptr + z * ens_z + h * ens_h + rows * ens_s, rows, rmask, 0, TAIL,
                                               HAS_STARTS, HAS_ENDS)
        dv = tl.arange(0, BLOCK_DV)
        # q and k as the sparse kernels read them (rows of contiguous head dims, Dqk split DA + DB): the same
        # code proven on the H100; a [BLOCK_D, BLOCK_N] transposed k load padded from D = 40 to 64 gave wrong
        # values and illegal accesses there (Triton 3.6, 4 warps, 64 x 64 tiles).
        da, db, q_a, q_b = _load_q(q_ptr + z * qs_z + h * qs_h + rows[:, None] * qs_s, rmask, D, DA, DB)
        k_base = k_ptr + z * ks_z + h * ks_h
        v_base = v_ptr + z * vs_z + h * vs_h
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        if HAS_SINK:  # the sink is one more (value-less) score of each row: the softmax starts from it
            sk = tl.load(sk_ptr + z * sks_z + h * sks_h + rows * sks_s, mask=rmask, other=0.0).to(tl.float32)
            m_i = sk * 1.4426950408889634
            l_i = tl.where(sk == float("-inf"), 0.0, 1.0)  # exp(sink - sink), or nothing for a -inf sink
        acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
        tb_base = tb_ptr + z * tbs_z + h * tbs_h
        m_i, l_i, acc = _attend_span(q_a, q_b, k_base, ks_t, v_base, vs_t, vs_d, lo, hi, span_lo, span_hi, scale,
                                     tb_base, tbs_s, tbs_t, 0, rows, m_i, l_i, acc, da, db, dv, D, DB, DV, False,
                                     MM_DTYPE, SCORES_DTYPE, ROUND, QK_PREC, PV_PREC, INTERPRETED, BLOCK_N)
        if HAS_TAIL:
            lo, hi, span_lo, span_hi = _row_window(ts_ptr + z * tss_z + h * tss_h + rows * tss_s,
                                                   te_ptr + z * tes_z + h * tes_h + rows * tes_s, rows, rmask, TAIL,
                                                   T - TAIL, HAS_TAIL_STARTS, HAS_TAIL_ENDS)
            m_i, l_i, acc = _attend_span(q_a, q_b, k_base, ks_t, v_base, vs_t, vs_d, lo, hi, span_lo, span_hi,
                                         scale, tb_base, tbs_s, tbs_t, TAIL, rows, m_i, l_i, acc, da, db, dv, D, DB,
                                         DV, HAS_TAIL_BIAS, MM_DTYPE, SCORES_DTYPE, ROUND, QK_PREC, PV_PREC,
                                         INTERPRETED, BLOCK_N)
        empty = l_i == 0.0  # no key in the window, or all -inf: NaN, as eager's softmax
        out = tl.where(empty[:, None], float("nan"), acc / tl.where(empty, 1.0, l_i)[:, None])
        tl.store(o_ptr + z * os_z + h * os_h + rows[:, None] * os_s + dv[None, :],
                 _to(out, o_ptr.dtype.element_ty, INTERPRETED), mask=rmask[:, None] & (dv[None, :] < DV))

    @triton.jit
    def _to(x, DTYPE: tl.constexpr, INTERPRETED: tl.constexpr):
        """fp32 ``x`` rounded to ``DTYPE`` to nearest even, as torch rounds.  Triton's interpreter truncates
        fp32 -> bf16 (3.9, ``interpreter.py`` ``cast_impl``); under it the rounding is done on the bits."""
        if INTERPRETED:
            if DTYPE == tl.bfloat16:
                bits = x.to(tl.uint32, bitcast=True)
                bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
                x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # (NaN kept as is)
        return x.to(DTYPE)


_TL_DTYPES = {}
if triton is not None:
    _TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def windowed_attention_triton(q, k, v, row_starts=None, row_ends=None, scale=1.0, scores_dtype=None, sinks=None,
                              tail=None, tail_starts=None, tail_ends=None, tail_bias=None,
                              block_m=None, block_n=None, num_warps=None, num_stages=None):
    """Run the Triton kernel (the op's CUDA path; tests and tuning call it directly).

    ``block_m`` (query rows per program), ``block_n`` (keys per tile), ``num_warps`` and ``num_stages`` are
    tunables (defaults ``CONFIG_16`` / ``CONFIG_32`` by q's dtype); tests shrink the tiles so that several
    blocks and tiles run under ``TRITON_INTERPRET=1``.
    """
    if triton is None:
        raise RuntimeError("windowed_attention: triton is not installed")
    scores_dtype = scores_dtype or q.dtype
    shape = by_metadata(_check_args, q, k, v, row_starts, row_ends, scale, scores_dtype, sinks, tail, tail_starts,
                        tail_ends, tail_bias)
    batch, s, t, d, dvn = shape[:-2], shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    out = q.new_empty(shape, dtype=v.dtype)
    if out.numel() == 0:
        return out
    if t == 0:  # eager: softmax over no key is empty, and the empty matmul is 0
        return out.zero_()
    q_, qs = _zh_strides(_last_contiguous(q), batch, (s, d))  # (the kernel reads head dims contiguous)
    k_, ks = _zh_strides(_last_contiguous(k), batch, (t, d))
    v_, vs = _zh_strides(v, batch, (t, dvn))
    n_head = t if tail is None else min(max(int(tail), 0), t)

    def optional(x, last):  # an absent tensor: q stands in as an unused pointer, its strides 0
        return _zh_strides(x, batch, last) if x is not None else (q, (0,) * (2 + len(last)))

    st_, sts = optional(row_starts, (s,))
    en_, ens = optional(row_ends, (s,))
    sk_, sks = optional(sinks, (s,))
    ts_, tss = optional(tail_starts, (s,))
    te_, tes = optional(tail_ends, (s,))
    tb_, tbs = optional(tail_bias, (s, t - n_head))
    h = batch[-1] if batch else 1
    z = out.numel() // (h * s * dvn)
    cfg = dict(CONFIG_WIDE if max(d, dvn) > 256 else CONFIG_32 if q.dtype == torch.float32 else CONFIG_16)
    cfg.update({n: x for n, x in (("block_m", block_m), ("block_n", block_n), ("num_warps", num_warps),
                                  ("num_stages", num_stages)) if x})
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not interpret:
        refuse_miscompiled_tile("windowed_attention", cfg["block_m"], cfg["block_n"], cfg["num_warps"])
    upcast = interpret  # 16-bit dots upcast, bf16 rounding on the bits (see _up, _to)
    fp32 = "ieee" if interpret else FP32_PRECISION

    def prec(dtype):
        return fp32 if dtype == torch.float32 or upcast else "tf32"

    grid = (cdiv(s, cfg["block_m"]) * z * h,)
    da, db, dvp = _dims(d, dvn)
    _windowed_attention_kernel[grid](
        q_, *qs[:-1], k_, *ks[:-1], v_, *vs, st_, *sts, en_, *ens, sk_, *sks, ts_, *tss, te_, *tes, tb_, *tbs,
        out, h * s * dvn, s * dvn, dvn, s, t, n_head, h,
        float(scale),
        D=d, DV=dvn, DA=da, DB=db, BLOCK_DV=dvp,
        HAS_STARTS=row_starts is not None, HAS_ENDS=row_ends is not None, HAS_SINK=sinks is not None,
        HAS_TAIL=tail is not None, HAS_TAIL_STARTS=tail_starts is not None, HAS_TAIL_ENDS=tail_ends is not None,
        HAS_TAIL_BIAS=tail_bias is not None,
        MM_DTYPE=_TL_DTYPES[q.dtype], SCORES_DTYPE=_TL_DTYPES[scores_dtype],
        ROUND=q.dtype != torch.float32 or scores_dtype != torch.float32,
        QK_PREC=prec(q.dtype), PV_PREC=prec(v.dtype), INTERPRETED=upcast,
        BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


@fused_op(OP_NAME)
def windowed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    row_starts: Optional[torch.Tensor],
    row_ends: Optional[torch.Tensor],
    scale: float,
    scores_dtype: torch.dtype,
    sinks: Optional[torch.Tensor] = None,
    tail: Optional[int] = None,
    tail_starts: Optional[torch.Tensor] = None,
    tail_ends: Optional[torch.Tensor] = None,
    tail_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Fused ``softmax(where(keep, (q @ k^T) * scale, -inf), -1) @ v`` over per-row key windows, with an
    optional attention sink (DeepSeek-V4, gpt-oss: ``softmax(cat([scores, sink], -1))[..., :-1] @ v``).

    Args:
        q: ``[..., S, D]`` float32 / float16 / bfloat16 (any strides).
        k: ``[..., T, D]``, q's dtype.
        v: ``[..., T, Dv]``, any of the three float dtypes (the weights are rounded to it before ``@ v``).
        row_starts, row_ends: optional int32/int64 per-row bounds, broadcastable to the rows ``[..., S]``:
            keys ``row_starts <= j < row_ends`` are kept (bounds past the row are clamped, as eager's
            ``arange`` comparison).
        scale: finite number multiplying the scores.
        scores_dtype: ``q.dtype`` or ``torch.float32``: the dtype the scale is applied in (``(q @ k^T) *
            scale`` in q's dtype, or ``(q @ k^T).float() * scale``).
        sinks: optional float tensor broadcastable to the rows ``[..., S]`` (DeepSeek-V4: one learned logit
            per head, ``[H, 1]`` against rows ``[B, H, S]``): each row's softmax also counts ``exp(sink)``,
            a key with no value, so the weights sum to less than 1; computed in fp32.
        tail: optional int in ``[0, T]``: keys ``[tail, T)`` are a second segment (DeepSeek-V4's compressed
            keys, cat'ed after the sliding window's), not under ``row_starts`` / ``row_ends`` (which then
            apply to ``[0, tail)``) but under:
        tail_starts, tail_ends: optional int32/int64 per-row bounds relative to the tail (key ``tail + j``
            is kept when ``tail_starts <= j < tail_ends``; V4's HCA layers: ``j < (position + 1) // m``);
        tail_bias: optional float ``[..., S, T - tail]`` additive mask on the tail's scaled scores, in
            ``scores_dtype`` (V4's CSA layers: 0 at the indexer's picks, -inf elsewhere).

    Returns:
        ``[*batch, S, Dv]`` in ``v.dtype`` (batch: the broadcast of the batch dims of q, k, v and the
        bounds); NaN rows where a row's window holds no key, as eager (zeros with a finite sink, as eager).

    Raises:
        ValueError / TypeError naming the argument: bad rank, dtype, device, shapes or broadcast.
    """
    args = (q, k, v, row_starts, row_ends, scale, scores_dtype, sinks, tail, tail_starts, tail_ends, tail_bias)
    if q.device.type != "cuda":  # (on CUDA, the *_triton function checks them)
        _check_args(*args)
        return windowed_attention_reference(*args)
    out = windowed_attention_triton(*args)
    if VERIFY:
        why = windowed_attention_mismatch(windowed_attention_reference(*args), out, q.dtype)
        if why is not None:
            raise AssertionError(f"dsa_inductor verify: rule windowed_attention ({OP_NAME}) differs from eager: {why}")
    return out


@windowed_attention.register_fake
def _windowed_attention_fake(q, k, v, row_starts, row_ends, scale, scores_dtype, sinks=None, tail=None,
                             tail_starts=None, tail_ends=None, tail_bias=None):
    return q.new_empty(_check_args(q, k, v, row_starts, row_ends, scale, scores_dtype, sinks, tail, tail_starts,
                                   tail_ends, tail_bias), dtype=v.dtype)
