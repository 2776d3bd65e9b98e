"""``dsa_inductor::sparse_attention``: attention of each query over its own top-k keys only.

Idiom (DeepSeek-V3.2 DSA, arXiv 2512.02556; transformers' ``DeepseekV32Attention`` eager and sdpa paths;
FlashMLA's ``flash_mla_sparse_fwd`` reference test; DeepSeek-V4's attention sink)::

    index_mask = ones(B, S, T, dtype=bool).scatter(-1, topk_indices, False)      # dense-mask form
    scores = (q @ k.transpose(-1, -2)) * scale + where(causal & ~index_mask, 0, -inf)
    out = softmax(scores, -1, dtype=float32).to(q.dtype) @ v

    k_sel = kv[b, topk_indices]                                                   # gather form
    scores = einsum("bshd,bskd->bshk", q, k_sel) * scale
    out = einsum("bshk,bskd->bshd", softmax(scores.masked_fill(topk_indices == -1, -inf)), v_sel)

Semantics, per batch ``b``, query ``s`` and head ``h``: the keys are ``topk_indices[b, s, :]``; a key
``j`` is *valid* when ``0 <= j < T``, ``j < row_ends[b, s]`` (if given), ``keep_mask[b, s, j]`` (if given)
and, with ``dedup``, it is the first occurrence of ``j`` in the row (the dense mask holds each key once,
the gather form counts a repeated index twice).  Then::

    logit_j = scale * <q[b, s, h], k[b, j, h // (H // Hk)]>        (fp32 accumulation)
    p = softmax([logit_j for valid j] (+ [attn_sink[h]]))       (the sink's own column is dropped)
    out[b, s, h] = sum_j round(p_j) * v[b, j, ...]              (p rounded to v's dtype, fp32 sum)

``v`` None means MLA: ``v = k[..., :dv]`` (DeepSeek's latent ``kv`` [B, T, 1, 576] with dv = 512).
A row with no valid key and no sink is what the matched eager graph computes, chosen by ``empty_row``:
``EMPTY_NAN`` (0: ``softmax`` over all ``-inf``), ``EMPTY_ZERO`` (1: SDPA's safe softmax, FlashMLA's
reference), ``EMPTY_UNIFORM`` (2: a ``finfo.min`` fill makes every key of the row equal, so eager's
weights are ``1/T`` over all T keys: the mean of ``v`` over the T keys).  With a sink such a row is 0.
Invalid keys are never read.  Non-finite q/k/v values are not propagated from keys that are not selected
(eager's dense form multiplies them by 0, which gives NaN for an inf/NaN value).

CUDA path (``sparse_attention_triton``), after FlashMLA's sparse prefill: with a shared latent (Hk = 1)
a first kernel packs each row's valid indices (in range, before ``row_ends``, kept by ``keep_mask``, a
repeated key once under ``dedup``) at the front of a scratch row; then one program per ``(b, s, block of
BLOCK_H heads)`` walks only those, with no branch in its loop (Triton pipelines the gathered loads: on an
H100 at the DeepSeek-V3.2 shape this took the kernel from 153 to 280 TFLOP/s), and loads each tile of
``BLOCK_K`` key rows
once for all its heads and runs ``[BLOCK_H, Dqk] x [Dqk, BLOCK_K]`` on tensor cores, the ``Dqk`` dot
split into a power-of-two part and a rest (576 = 512 + 64); an online softmax in fp32 (exp2); then
``P @ V`` with ``V`` the first ``dv`` columns of the tile already loaded.  Per-head keys (Hk = H, e.g.
transformers' expanded MLA) take one program per ``(b, s, h)`` with vector reductions.

CPU path: plain torch, the gather form (what eager computes), which Inductor compiles when traced.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch

from ..testing import attention_mismatch  # noqa: F401  (the equivalence contract; re-exported)
from .host import broadcast_shapes
from .registry import fused_op

try:  # triton is optional on CPU-only installs; the CPU path never needs it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None

OP_NAME = "dsa_inductor::sparse_attention"
VERIFY = False  # set by register_dsa_passes(verify=True): check each CUDA call against eager
EMPTY_NAN, EMPTY_ZERO, EMPTY_UNIFORM = 0, 1, 2
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634
# Tunables of the shared-latent kernel (bench/tune_sparse_attention.py sweeps them on an H100).
BLOCK_H = 64
BLOCK_K = 64
NUM_WARPS = 8
NUM_STAGES = 1  # without compaction (the tile-skip branch keeps Triton from pipelining the loop)
COMPACT = True  # pack each row's valid indices first (_compact_kernel): a branch-free, pipelined key loop
COMPACT_STAGES = 2


def _check_args(q, k, v, topk_indices, row_ends, keep_mask, attn_sink, scale, dv, empty_row, out_dtype):
    """Raise ValueError/TypeError naming the offending argument."""
    name = "sparse_attention"
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"{name}: `q` must be a 4-d tensor [B, S, H, Dqk], got {getattr(q, 'shape', q)}")
    if q.dtype not in _FLOATS:
        raise TypeError(f"{name}: `q` must be float32, float16 or bfloat16, got {q.dtype}")
    b, s, h, d = q.shape
    if not isinstance(k, torch.Tensor) or k.dim() != 4:
        raise ValueError(f"{name}: `k` must be a 4-d tensor [B, T, Hk, Dqk], got {getattr(k, 'shape', k)}")
    if k.dtype != q.dtype or k.device != q.device:
        raise TypeError(f"{name}: `k` must have the dtype and device of `q` ({q.dtype}, {q.device}), "
                        f"got {k.dtype}, {k.device}")
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"{name}: `k` {tuple(k.shape)} does not match `q` {tuple(q.shape)} in B or Dqk")
    hk = k.shape[2]
    if hk not in (1, h):
        raise ValueError(f"{name}: `k` has {hk} heads; must be 1 (shared latent) or H = {h}")
    if v is None:
        if not isinstance(dv, (int, torch.SymInt)) or not 1 <= dv <= d:
            raise ValueError(f"{name}: `dv` must be in [1, Dqk = {d}] when `v` is None (v = k[..., :dv]), got {dv}")
    else:
        if not isinstance(v, torch.Tensor) or v.dim() != 4:
            raise ValueError(f"{name}: `v` must be a 4-d tensor [B, T, Hk, Dv]")
        if v.dtype != q.dtype or v.device != q.device:
            raise TypeError(f"{name}: `v` must have the dtype and device of `q`, got {v.dtype}, {v.device}")
        if tuple(v.shape[:3]) != tuple(k.shape[:3]) or v.shape[3] != dv:
            raise ValueError(f"{name}: `v` {tuple(v.shape)} must be [B, T, Hk, dv] like `k` "
                             f"{tuple(k.shape)} with dv = {dv}")
    if not isinstance(topk_indices, torch.Tensor) or topk_indices.dim() != 3:
        raise ValueError(f"{name}: `topk_indices` must be a 3-d tensor [B, S, K]")
    if topk_indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: `topk_indices` must be int32 or int64, got {topk_indices.dtype}")
    if tuple(topk_indices.shape[:2]) != (b, s) or topk_indices.device != q.device:
        raise ValueError(f"{name}: `topk_indices` {tuple(topk_indices.shape)} must be [B={b}, S={s}, K] on "
                         f"{q.device}")
    if row_ends is not None:
        if not isinstance(row_ends, torch.Tensor) or row_ends.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name}: `row_ends` must be an int32/int64 tensor")
        if row_ends.device != q.device or row_ends.dim() > 2:
            raise ValueError(f"{name}: `row_ends` must be [B, S] (broadcastable) on {q.device}")
        try:
            broadcast_shapes(row_ends.shape, (b, s))
        except RuntimeError:
            raise ValueError(f"{name}: `row_ends` {tuple(row_ends.shape)} does not broadcast to [B, S] = "
                             f"{(b, s)}") from None
    if keep_mask is not None:
        if not isinstance(keep_mask, torch.Tensor) or keep_mask.dtype != torch.bool:
            raise TypeError(f"{name}: `keep_mask` must be a bool tensor")
        if keep_mask.device != q.device or keep_mask.dim() > 3:
            raise ValueError(f"{name}: `keep_mask` must be [B, S, T] (broadcastable) on {q.device}")
        try:
            broadcast_shapes(keep_mask.shape, (b, s, k.shape[1]))
        except RuntimeError:
            raise ValueError(f"{name}: `keep_mask` {tuple(keep_mask.shape)} does not broadcast to [B, S, T] = "
                             f"{(b, s, k.shape[1])}") from None
    if attn_sink is not None:
        if not isinstance(attn_sink, torch.Tensor) or attn_sink.dtype not in _FLOATS:
            raise TypeError(f"{name}: `attn_sink` must be a float tensor [H]")
        if tuple(attn_sink.shape) != (h,) or attn_sink.device != q.device:
            raise ValueError(f"{name}: `attn_sink` must be [H = {h}] on {q.device}, got {tuple(attn_sink.shape)}")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{name}: `scale` must be a finite number, got {scale}")
    if empty_row not in (EMPTY_NAN, EMPTY_ZERO, EMPTY_UNIFORM):
        raise ValueError(f"{name}: `empty_row` must be 0 (NaN), 1 (zero) or 2 (uniform), got {empty_row}")
    if out_dtype not in _FLOATS:
        raise TypeError(f"{name}: `out_dtype` must be float32, float16 or bfloat16, got {out_dtype}")


def valid_keys(topk_indices, t, row_ends=None, keep_mask=None, dedup=False):
    """``(valid [B, S, K] bool, safe indices [B, S, K] int64)``: which selected keys count (see module doc)."""
    idx = topk_indices.long()
    valid = (idx >= 0) & (idx < t)
    if row_ends is not None:
        valid = valid & (idx < row_ends.long().expand(idx.shape[:2]).unsqueeze(-1))
    safe = torch.where(valid, idx, torch.zeros_like(idx))
    if keep_mask is not None:
        valid = valid & keep_mask.expand(idx.shape[0], idx.shape[1], t).gather(-1, safe)
    if dedup:
        valid = valid & ~_repeated(idx)
    return valid, safe


def _repeated(idx):
    """True where an index already occurred earlier in its row (the dense mask holds each key once)."""
    order = idx.argsort(dim=-1, stable=True)
    srt = idx.gather(-1, order)
    dup_sorted = torch.cat([torch.zeros_like(srt[..., :1], dtype=torch.bool), srt[..., 1:] == srt[..., :-1]], -1)
    return torch.zeros_like(dup_sorted).scatter(-1, order, dup_sorted)


def sparse_attention_reference(q, k, v, topk_indices, row_ends=None, keep_mask=None, attn_sink=None,
                               scale=1.0, dv=None, empty_row=EMPTY_NAN, dedup=False, out_dtype=None):
    """Plain-torch definition of the op (its CPU path, and the oracle of the kernel tests)."""
    out_dtype = out_dtype or q.dtype
    b, s, h, d = q.shape
    t, hk = k.shape[1], k.shape[2]
    if v is None:
        v = k[..., :dv]
    valid, safe = valid_keys(topk_indices, t, row_ends, keep_mask, dedup)
    bi = torch.arange(b, device=q.device).view(b, 1, 1)
    kg = k[bi, safe]  # [B, S, K, Hk, D]
    vg = v[bi, safe]  # [B, S, K, Hk, Dv]
    rep = h // hk
    qg = q.float().view(b, s, hk, rep, d)
    logits = torch.einsum("bsgrd,bskgd->bsgrk", qg, kg.float()).reshape(b, s, h, -1) * scale
    logits = logits.masked_fill(~valid.unsqueeze(2), float("-inf"))
    if attn_sink is not None:
        sink = attn_sink.float().view(1, 1, h, 1).expand(b, s, h, 1)
        p = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
    else:
        p = torch.softmax(logits, dim=-1)
    p = p.to(v.dtype).float().view(b, s, hk, rep, -1)
    out = torch.einsum("bsgrk,bskgd->bsgrd", p, vg.float()).reshape(b, s, h, -1)
    if attn_sink is None and empty_row != EMPTY_NAN:
        empty = ~valid.any(-1)  # [B, S]
        if empty_row == EMPTY_ZERO:
            fill = torch.zeros_like(out)
        else:
            fill = v.float().mean(dim=1).repeat_interleave(rep, dim=1)[:, None].expand_as(out)  # [B, 1, H, Dv]
        out = torch.where(empty[:, :, None, None], fill, out)
    return out.to(out_dtype)


def _pow2_floor(n):
    return 1 << (max(n, 1).bit_length() - 1)


def _dims(d, dv):
    """Kernel tile widths: Dqk = DA + DB (DA a power of two, DB the padded rest), Dv padded."""
    da = max(16, _pow2_floor(d))
    rest = d - da
    db = 0 if rest <= 0 else max(16, triton.next_power_of_2(rest))
    return da, db, max(16, triton.next_power_of_2(dv))


if triton is not None:

    @triton.jit(do_not_specialize=["S", "T", "K"])
    def _sparse_mla_kernel(
        q_ptr, qs_b, qs_s, qs_h,
        k_ptr, ks_b, ks_t,
        v_ptr, vs_b, vs_t,
        i_ptr, is_b, is_s, is_k,
        re_ptr, res_b, res_s,
        m_ptr, ms_b, ms_s, ms_t,
        sink_ptr, fill_ptr, fs_b, fs_h,
        o_ptr, os_b, os_s, os_h,
        S, T, K, H, scale_log2, c_ptr, n_ptr,
        D: tl.constexpr, DV: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, DVP: tl.constexpr,
        V_IS_KA: tl.constexpr, HAS_ENDS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SINK: tl.constexpr,
        EMPTY_ROW: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, COMPACT: tl.constexpr,
    ):
        """Shared latent (Hk = 1): one program per (b, s, block of BLOCK_H heads).  COMPACT: the row's valid
        indices were packed first (``_compact_kernel``: ``c_ptr`` [B*S, K], count ``n_ptr``), so the loop runs
        over valid keys only and has no branch (Triton then pipelines the gathered loads, ``num_stages``)."""
        row = tl.program_id(0).to(tl.int64)
        b = row // S
        s = row % S
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        hmask = heads < H
        da = tl.arange(0, DA)
        q_row = q_ptr + b * qs_b + s * qs_s + heads[:, None] * qs_h
        q_a = tl.load(q_row + da[None, :], mask=hmask[:, None] & (da[None, :] < D), other=0.0)
        if DB > 0:
            db = DA + tl.arange(0, DB)
            q_b = tl.load(q_row + db[None, :], mask=hmask[:, None] & (db[None, :] < D), other=0.0)
        else:
            db = da
            q_b = q_a
        kb = k_ptr + b * ks_b
        vb = v_ptr + b * vs_b
        dvv = tl.arange(0, DVP)
        m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_H,), tl.float32)
        acc = tl.zeros((BLOCK_H, DVP), tl.float32)
        if COMPACT:
            n_valid = tl.load(n_ptr + row)
            c_row = c_ptr + row * K
            for k0 in range(0, n_valid, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                valid = kk < n_valid
                idx = tl.load(c_row + kk, mask=valid, other=0).to(tl.int64)
                m_i, l_i, acc = _mla_tile(q_a, q_b, kb, ks_t, vb, vs_t, idx, valid, da, db, dvv, m_i, l_i, acc,
                                          scale_log2, D, DV, DB, V_IS_KA, PREC, UPCAST)
        else:
            end = _row_end(re_ptr, res_b, res_s, b, s, T, HAS_ENDS)
            i_row = i_ptr + b * is_b + s * is_s
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                idx, valid = _tile_keys(i_row, is_k, kk, K, end, m_ptr + b * ms_b + s * ms_s, ms_t, HAS_MASK)
                if tl.sum(valid.to(tl.int32), 0) > 0:  # a tile with no valid key (padding, causal future) is skipped
                    m_i, l_i, acc = _mla_tile(q_a, q_b, kb, ks_t, vb, vs_t, idx, valid, da, db, dvv, m_i, l_i,
                                              acc, scale_log2, D, DV, DB, V_IS_KA, PREC, UPCAST)
        out = _finish(acc, m_i, l_i, heads, hmask, sink_ptr, fill_ptr + b * fs_b, fs_h, dvv, DV,
                      HAS_SINK, EMPTY_ROW)
        o_row = o_ptr + b * os_b + s * os_s + heads[:, None] * os_h
        tl.store(o_row + dvv[None, :], out.to(o_ptr.dtype.element_ty), mask=hmask[:, None] & (dvv[None, :] < DV))

    @triton.jit(do_not_specialize=["S", "T", "K"])
    def _compact_kernel(i_ptr, is_b, is_s, is_k, re_ptr, res_b, res_s, m_ptr, ms_b, ms_s, ms_t, c_ptr, n_ptr,
                        seen_ptr, W, S, T, K, HAS_ENDS: tl.constexpr, HAS_MASK: tl.constexpr, DEDUP: tl.constexpr,
                        BLOCK: tl.constexpr):
        """One program per (b, s): the row's valid indices (``0 <= idx < row_end``, kept by the mask), in
        their order, packed at the front of ``c_ptr[row]``; their count in ``n_ptr[row]``.  DEDUP: a key
        repeated in the row is packed once: ``seen_ptr`` is a zeroed bitmap of ``W = ceil(T / 32)`` words
        per row, and of the lanes that set a key's bit (``atomic_or``) only the one that found it clear keeps it."""
        row = tl.program_id(0).to(tl.int64)
        b = row // S
        s = row % S
        end = _row_end(re_ptr, res_b, res_s, b, s, T, HAS_ENDS)
        i_row = i_ptr + b * is_b + s * is_s
        n = 0
        for k0 in range(0, K, BLOCK):
            kk = k0 + tl.arange(0, BLOCK)
            idx, valid = _tile_keys(i_row, is_k, kk, K, end, m_ptr + b * ms_b + s * ms_s, ms_t, HAS_MASK)
            if DEDUP:
                bit = 1 << (idx & 31).to(tl.int32)
                prev = tl.atomic_or(seen_ptr + row * W + (idx >> 5), bit, mask=valid)
                valid = valid & ((prev & bit) == 0)
            pos = n + tl.cumsum(valid.to(tl.int32), 0) - 1
            tl.store(c_ptr + row * K + pos, idx.to(tl.int32), mask=valid)
            n += tl.sum(valid.to(tl.int32), 0)
        tl.store(n_ptr + row, n)

    @triton.jit
    def _row_end(re_ptr, res_b, res_s, b, s, T, HAS_ENDS: tl.constexpr):
        """The row's key bound: ``min(row_ends[b, s], T)``, or T without ``row_ends``."""
        end = T.to(tl.int64)
        if HAS_ENDS:
            end = tl.minimum(tl.load(re_ptr + b * res_b + s * res_s).to(tl.int64), end)
        return end

    @triton.jit
    def _tile_keys(i_row, is_k, kk, K, end, m_row, ms_t, HAS_MASK: tl.constexpr):
        """A tile's indices (int64; -1 past K) and which of them are valid: ``0 <= idx < end``, and kept by
        the row's mask when there is one (read only where the index is in range)."""
        idx = tl.load(i_row + kk * is_k, mask=kk < K, other=-1).to(tl.int64)
        valid = (idx >= 0) & (idx < end)
        if HAS_MASK:
            valid = valid & (tl.load(m_row + idx * ms_t, mask=valid, other=0) != 0)
        return idx, valid

    @triton.jit
    def _up(x, UPCAST: tl.constexpr):
        # Triton 3.9's interpreter computes a 16-bit tl.dot wrongly (values ~1e10 off): under it the tiles are
        # upcast to fp32 first, which is exact and gives the same fp32 products (see index_score).
        if UPCAST:
            return x.to(tl.float32)
        return x

    @triton.jit
    def _mla_tile(q_a, q_b, kb, ks_t, vb, vs_t, idx, valid, da, db, dvv, m_i, l_i, acc, scale_log2,
                  D: tl.constexpr, DV: tl.constexpr, DB: tl.constexpr, V_IS_KA: tl.constexpr, PREC: tl.constexpr,
                  UPCAST: tl.constexpr):
        """One gathered tile: S = q k^T (Dqk split DA + DB), online softmax (exp2), acc += P V."""
        k_rows = kb + idx * ks_t
        k_a = tl.load(k_rows[:, None] + da[None, :], mask=valid[:, None] & (da[None, :] < D), other=0.0)
        qk = tl.dot(_up(q_a, UPCAST), tl.trans(_up(k_a, UPCAST)), input_precision=PREC)
        if DB > 0:
            k_b = tl.load(k_rows[:, None] + db[None, :], mask=valid[:, None] & (db[None, :] < D), other=0.0)
            qk = tl.dot(_up(q_b, UPCAST), tl.trans(_up(k_b, UPCAST)), qk, input_precision=PREC)
        qk = tl.where(valid[None, :], qk * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(qk - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if V_IS_KA:
            vt = k_a  # MLA: V is the first dv = DA columns of the latent rows just loaded
        else:
            vt = tl.load((vb + idx * vs_t)[:, None] + dvv[None, :], mask=valid[:, None] & (dvv[None, :] < DV),
                         other=0.0)
        acc = tl.dot(_up(p.to(vt.dtype), UPCAST), _up(vt, UPCAST), acc * alpha[:, None], input_precision=PREC)
        return m_new, l_i, acc

    @triton.jit
    def _finish(acc, m_i, l_i, heads, hmask, sink_ptr, fill_row, fs_h, dvv, DV: tl.constexpr,
                HAS_SINK: tl.constexpr, EMPTY_ROW: tl.constexpr):
        """acc / l, with the sink's share of the denominator, or the empty-row value."""
        if HAS_SINK:
            sink = tl.load(sink_ptr + heads, mask=hmask, other=0.0).to(tl.float32) * 1.4426950408889634
            m_f = tl.maximum(m_i, sink)
            alpha = tl.exp2(m_i - m_f)
            l_f = l_i * alpha + tl.exp2(sink - m_f)
            out = acc * (alpha / l_f)[:, None]
        else:
            empty = l_i == 0.0
            out = acc / tl.where(empty, 1.0, l_i)[:, None]
            if EMPTY_ROW == 0:
                out = tl.where(empty[:, None], float("nan"), out)
            elif EMPTY_ROW == 2:
                fill = tl.load(fill_row + heads[:, None] * fs_h + dvv[None, :],
                               mask=empty[:, None] & hmask[:, None] & (dvv[None, :] < DV), other=0.0)
                out = tl.where(empty[:, None], fill, out)
        return out

    @triton.jit(do_not_specialize=["S", "T", "K"])
    def _sparse_mha_kernel(
        q_ptr, qs_b, qs_s, qs_h,
        k_ptr, ks_b, ks_t, ks_h,
        v_ptr, vs_b, vs_t, vs_h,
        i_ptr, is_b, is_s, is_k,
        re_ptr, res_b, res_s,
        m_ptr, ms_b, ms_s, ms_t,
        sink_ptr, fill_ptr, fs_b, fs_h,
        o_ptr, os_b, os_s, os_h,
        S, T, K, H, scale_log2,
        D: tl.constexpr, DV: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, DVP: tl.constexpr,
        HAS_ENDS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SINK: tl.constexpr, EMPTY_ROW: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """Per-head keys (Hk = H): one program per (b, s, h), vector reductions (no key reuse across heads)."""
        row = tl.program_id(0).to(tl.int64)
        b = row // S
        s = row % S
        h = tl.program_id(1)
        heads = h + tl.arange(0, 1)
        hmask = heads < H
        da = tl.arange(0, DA)
        q_row = q_ptr + b * qs_b + s * qs_s + h * qs_h
        q_a = tl.load(q_row + da, mask=da < D, other=0.0).to(tl.float32)
        if DB > 0:
            db = DA + tl.arange(0, DB)
            q_b = tl.load(q_row + db, mask=db < D, other=0.0).to(tl.float32)
        end = _row_end(re_ptr, res_b, res_s, b, s, T, HAS_ENDS)
        kb = k_ptr + b * ks_b + h * ks_h
        vb = v_ptr + b * vs_b + h * vs_h
        dvv = tl.arange(0, DVP)
        m_i = tl.full((1,), float("-inf"), tl.float32)
        l_i = tl.zeros((1,), tl.float32)
        acc = tl.zeros((1, DVP), tl.float32)
        i_row = i_ptr + b * is_b + s * is_s
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            idx, valid = _tile_keys(i_row, is_k, kk, K, end, m_ptr + b * ms_b + s * ms_s, ms_t, HAS_MASK)
            k_rows = kb + idx * ks_t
            k_a = tl.load(k_rows[:, None] + da[None, :], mask=valid[:, None] & (da[None, :] < D), other=0.0)
            qk = tl.sum(k_a.to(tl.float32) * q_a[None, :], 1)
            if DB > 0:
                k_b = tl.load(k_rows[:, None] + db[None, :], mask=valid[:, None] & (db[None, :] < D), other=0.0)
                qk += tl.sum(k_b.to(tl.float32) * q_b[None, :], 1)
            qk = tl.where(valid, qk * scale_log2, float("-inf"))[None, :]  # [1, BLOCK_K]
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(qk - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = tl.load((vb + idx * vs_t)[:, None] + dvv[None, :], mask=valid[:, None] & (dvv[None, :] < DV),
                         other=0.0)
            pv = tl.sum(tl.trans(p.to(vt.dtype).to(tl.float32)) * vt.to(tl.float32), 0)  # [DVP]
            acc = acc * alpha[:, None] + pv[None, :]
            m_i = m_new
        out = _finish(acc, m_i, l_i, heads, hmask, sink_ptr, fill_ptr + b * fs_b, fs_h, dvv, DV,
                      HAS_SINK, EMPTY_ROW)
        o_row = o_ptr + b * os_b + s * os_s + heads[:, None] * os_h
        tl.store(o_row + dvv[None, :], out.to(o_ptr.dtype.element_ty), mask=hmask[:, None] & (dvv[None, :] < DV))


def _last_contiguous(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def sparse_attention_triton(q, k, v, topk_indices, row_ends=None, keep_mask=None, attn_sink=None, scale=1.0,
                            dv=None, empty_row=EMPTY_NAN, dedup=False, out_dtype=None,
                            block_h=None, block_k=None, num_warps=None, num_stages=None, compact=None):
    """Run the Triton kernels (the op's CUDA path; tests and tuning call it directly).

    ``block_h`` (heads per program, shared latent only), ``block_k`` (keys per tile), ``num_warps``,
    ``num_stages`` and ``compact`` (pack each row's valid indices first, default ``COMPACT``) are tunables;
    tests shrink them so that several tiles run under ``TRITON_INTERPRET=1``.
    """
    if triton is None:
        raise RuntimeError("sparse_attention: triton is not installed")
    out_dtype = out_dtype or q.dtype
    dv = v.shape[-1] if v is not None else dv
    _check_args(q, k, v, topk_indices, row_ends, keep_mask, attn_sink, scale, dv, empty_row, out_dtype)
    b, s, h, d = q.shape
    t, hk = k.shape[1], k.shape[2]
    kk = topk_indices.shape[-1]
    out = q.new_empty(b, s, h, dv, dtype=out_dtype)
    if out.numel() == 0:
        return out
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    idx = topk_indices
    compact = COMPACT if compact is None else compact
    if dedup and not (compact and hk == 1):  # (the packing kernel drops repeats itself)
        idx = torch.where(_repeated(idx.long()), -1, idx)
    da, db, dvp = _dims(d, dv)
    v_is_ka = v is None and dv == da and hk == 1
    vt = k if v is None else v
    re = row_ends.expand(b, s) if row_ends is not None else idx
    mk = keep_mask.expand(b, s, t) if keep_mask is not None else idx
    sink = attn_sink if attn_sink is not None else q
    if empty_row == EMPTY_UNIFORM and attn_sink is None:
        fill = vt[..., :dv].float().mean(dim=1)  # [B, Hk, Dv]: eager's uniform weights over all T keys
        fill = fill.expand(b, h, dv) if hk == 1 else fill
    else:
        fill = q.new_zeros(1, 1, 1, dtype=torch.float32)
    scale_log2 = float(scale) * _LOG2E
    upcast = q.dtype != torch.float32 and os.environ.get("TRITON_INTERPRET") == "1"
    common = dict(HAS_ENDS=row_ends is not None, HAS_MASK=keep_mask is not None, HAS_SINK=attn_sink is not None,
                  EMPTY_ROW=int(empty_row), D=d, DV=dv, DA=da, DB=db, DVP=dvp)
    idx_args = (idx, idx.stride(0), idx.stride(1), idx.stride(2), re, re.stride(0), re.stride(1),
                mk, mk.stride(0), mk.stride(1), mk.stride(2), sink, fill, fill.stride(0), fill.stride(1),
                out, out.stride(0), out.stride(1), out.stride(2), s, t, kk, h, scale_log2)
    if hk == 1:
        bh = block_h or BLOCK_H
        bh = max(16, min(bh, triton.next_power_of_2(h)))
        if compact:
            packed = torch.empty(b * s, kk, dtype=torch.int32, device=q.device)
            counts = torch.empty(b * s, dtype=torch.int32, device=q.device)
            words = triton.cdiv(t, 32)
            # the dedup bitmap (without dedup the kernel never touches it: counts stands in as the pointer)
            seen = torch.zeros(b * s * words, dtype=torch.int32, device=q.device) if dedup else counts
            _compact_kernel[(b * s,)](idx, idx.stride(0), idx.stride(1), idx.stride(2), re, re.stride(0),
                                      re.stride(1), mk, mk.stride(0), mk.stride(1), mk.stride(2), packed, counts,
                                      seen, words, s, t, kk, HAS_ENDS=row_ends is not None,
                                      HAS_MASK=keep_mask is not None, DEDUP=dedup,
                                      BLOCK=min(max(16, triton.next_power_of_2(kk)), 4096), num_warps=4)
        else:
            packed = counts = idx
        _sparse_mla_kernel[(b * s, triton.cdiv(h, bh))](
            q, q.stride(0), q.stride(1), q.stride(2), k, k.stride(0), k.stride(1), vt, vt.stride(0), vt.stride(1),
            *idx_args, packed, counts, V_IS_KA=v_is_ka,
            PREC="ieee" if q.dtype == torch.float32 or upcast else "tf32", UPCAST=upcast,
            BLOCK_H=bh, BLOCK_K=block_k or BLOCK_K, COMPACT=compact, num_warps=num_warps or NUM_WARPS,
            num_stages=num_stages or (COMPACT_STAGES if compact else NUM_STAGES), **common)
    else:
        _sparse_mha_kernel[(b * s, h)](
            q, q.stride(0), q.stride(1), q.stride(2), k, k.stride(0), k.stride(1), k.stride(2),
            vt, vt.stride(0), vt.stride(1), vt.stride(2), *idx_args,
            BLOCK_K=block_k or 64, num_warps=num_warps or 4, **common)
    return out



@fused_op(OP_NAME)
def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: Optional[torch.Tensor],
    topk_indices: torch.Tensor,
    row_ends: Optional[torch.Tensor],
    keep_mask: Optional[torch.Tensor],
    attn_sink: Optional[torch.Tensor],
    scale: float,
    dv: int,
    empty_row: int,
    dedup: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Attention of each query over its ``topk_indices`` keys only (see the module docstring).

    Args:
        q: ``[B, S, H, Dqk]`` float32 / float16 / bfloat16.
        k: ``[B, T, Hk, Dqk]``, Hk = 1 (MLA latent shared by all heads) or H; q's dtype.
        v: ``[B, T, Hk, dv]`` or None (then ``v = k[..., :dv]``, MLA).
        topk_indices: ``[B, S, K]`` int32/int64 key positions; out of ``[0, T)`` (e.g. -1 padding) = no key.
        row_ends: optional int ``[B, S]`` (broadcastable): keys ``j >= row_ends`` are hidden (causal bound).
        keep_mask: optional bool ``[B, S, T]`` (broadcastable), read only at the selected keys.
        attn_sink: optional ``[H]`` per-head sink logit (DeepSeek-V4), a softmax column that is dropped.
        scale: softmax scale applied to ``q . k``.
        dv: value head dim.
        empty_row: value of a row with no valid key and no sink: 0 NaN, 1 zeros, 2 mean of v over T.
        dedup: count a key repeated in a row once (the dense-mask form) rather than once per occurrence.
        out_dtype: result dtype.

    Returns:
        ``[B, S, H, dv]`` in ``out_dtype``.

    Raises:
        ValueError / TypeError naming the argument: bad rank, shape, dtype or device.
    """
    args = (q, k, v, topk_indices, row_ends, keep_mask, attn_sink, scale, dv, empty_row, dedup, out_dtype)
    if q.device.type != "cuda":  # (on CUDA, the *_triton function checks them)
        _check_args(q, k, v, topk_indices, row_ends, keep_mask, attn_sink, scale, dv, empty_row, out_dtype)
        return sparse_attention_reference(*args)
    out = sparse_attention_triton(*args)
    if VERIFY:
        why = attention_mismatch(sparse_attention_reference(*args), out)
        if why is not None:
            raise AssertionError(f"dsa_inductor verify: rule sparse_attention ({OP_NAME}) differs from eager: {why}")
    return out


@sparse_attention.register_fake
def _sparse_attention_fake(q, k, v, topk_indices, row_ends, keep_mask, attn_sink, scale, dv, empty_row, dedup,
                           out_dtype):
    _check_args(q, k, v, topk_indices, row_ends, keep_mask, attn_sink, scale, dv, empty_row, out_dtype)
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], dv, dtype=out_dtype)
