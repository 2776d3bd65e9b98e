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
Invalid keys are never read, and non-finite q/k/v values are not propagated from keys that are not selected
(eager's dense form multiplies them by 0, which gives NaN for an inf/NaN value); except on the masked flash
path below, which reads whole key tiles (in bounds): there an inf/NaN in ``v`` at a key of a visited tile
that the row does not select makes the row NaN, as in eager's dense form (``k`` is still masked out).

CUDA path (``sparse_attention_triton``), after FlashMLA's sparse prefill: with a shared latent (Hk = 1)
a first kernel packs each row's valid indices (in range, before ``row_ends``, kept by ``keep_mask``, a
repeated key once under ``dedup``) at the front of a scratch row; then one program per ``(b, s, block of
BLOCK_H heads)`` walks only those, with no branch in its loop (Triton pipelines the gathered loads: on an
H100 at the DeepSeek-V3.2 shape this took the kernel from 153 to 280 TFLOP/s), and loads each tile of
``BLOCK_K`` key rows
once for all its heads and runs ``[BLOCK_H, Dqk] x [Dqk, BLOCK_K]`` on tensor cores, the ``Dqk`` dot
split into a power-of-two part and a rest (576 = 512 + 64); an online softmax in fp32 (exp2); then
``P @ V`` with ``V`` the first ``dv`` columns of the tile already loaded.

Per-head keys (Hk > 1: transformers' expanded MLA has Hk = H; GQA, Hk dividing H, reads kv head
``h // (H // Hk)``) with ``dedup``, which the dense-mask rule always sets for them, take a dense-tile
*masked flash attention*.  A per-(query, head) gather re-reads each query-head's keys (1.3 MB at transformers'
DeepSeek-V3.2 shape: 2048 keys x (192 + 128) bf16), memory bound, with no reuse.  Instead a first kernel
sets a selection bitmask ``[B * S, ceil(T / 32)]`` int32 (``atomic_or`` of bit ``j % 32`` into word
``j // 32`` for every valid selected key ``j``: a repeated key counts once, so this is exact only with
dedup); a second lists, for each block of ``BLOCK_M`` query rows, the key tiles (``BLOCK_N`` keys) where
some row of the block has a bit; then one program per ``(block of BLOCK_M queries, b, h)`` walks only those
tiles (branch-free: Triton pipelines the k/v loads) and runs ``q @ k^T`` and ``P @ V`` on tensor cores over
whole ``[BLOCK_N, Dqk]`` / ``[BLOCK_N, Dv]`` tiles read once for the block, the logits masked by the rows'
bits.  Its cost is that of dense attention over the visited tiles: with the indexer's causal top-k, dense
causal attention (every tile of the causal range holds a key some row selects), not ``S * K``; clustered
selections skip tiles.  Per-head keys without dedup (the gather form: a repeated index counts twice) take
one single-warp program per ``(b, s, h)`` with vector reductions.

CPU path: plain torch, the gather form (what eager computes), which Inductor compiles when traced.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch

from ..testing import attention_mismatch  # noqa: F401  (the equivalence contract; re-exported)
from .host import broadcast_shapes, by_metadata, cdiv, next_pow2, refuse_miscompiled_tile
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
# Tunables of the per-head masked flash kernel (Hk > 1 with dedup): query rows per program, keys per tile (a
# power of two >= 32: whole words of the selection bitmask), warps, pipeline stages; for 16-bit inputs with
# Dqk, Dv <= 256 (transformers' 192 / 128: 168 registers, no spill, compiled for sm_90).  FLASH_WIDE
# (BLOCK_M, BLOCK_N, warps, stages) serves fp32 (IEEE dots run on FMA units) and wider heads, where the
# first would spill heavily.
# H100, B=1 S=T=4096 H=128 192/128 bf16, the indexer's causal topk 2048 (bench/tune_sparse_attention.py
# --per-head): 128/128/8/2 2147 us, 128/64/8/2 2481 us, 64/64/4/2 2206 us.  Tiles of 128 keys double-buffered
# need Dqk + Dv <= 320 to fit shared memory; wider heads take FLASH_BLOCK_N_WIDE.  64/64/4 is refused on a GPU
# since session 11 (host.refuse_miscompiled_tile: Triton 3.6 gives wrong values at odd head dims).
FLASH_BLOCK_M = 128
FLASH_BLOCK_N = 128
FLASH_BLOCK_N_WIDE = 64
FLASH_WARPS = 8
FLASH_STAGES = 2
FLASH_WIDE = (64, 32, 8, 2)
# The per-head gather kernel (Hk > 1 without dedup): one warp, so its reductions and layout changes stay in a warp
# (no shared memory at all, compiled for sm_90: nothing for compute-sanitizer's racecheck to flag).
MHA_BLOCK_K = 16
MHA_WARPS = 1


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
    if hk < 1 or h % hk:
        raise ValueError(f"{name}: `k` has {hk} heads; must divide H = {h} (1: shared latent, H: per head)")
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
    db = 0 if rest <= 0 else max(16, next_pow2(rest))
    return da, db, max(16, next_pow2(dv))


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
        da, db, q_a, q_b = _load_q(q_ptr + b * qs_b + s * qs_s + heads[:, None] * qs_h, hmask, D, DA, DB)
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
        out = _finish(acc, m_i[:, None], l_i[:, None], heads[:, None], hmask[:, None], sink_ptr, fill_ptr + b * fs_b,
                      fs_h, dvv[None, :], DV, HAS_SINK, EMPTY_ROW)
        o_row = o_ptr + b * os_b + s * os_s + heads[:, None] * os_h
        tl.store(o_row + dvv[None, :], out.to(o_ptr.dtype.element_ty), mask=hmask[:, None] & (dvv[None, :] < DV))

    @triton.jit(do_not_specialize=["S", "T", "K"])
    def _compact_kernel(i_ptr, is_b, is_s, is_k, re_ptr, res_b, res_s, m_ptr, ms_b, ms_s, ms_t, c_ptr, n_ptr,
                        seen_ptr, W, S, T, K, HAS_ENDS: tl.constexpr, HAS_MASK: tl.constexpr, DEDUP: tl.constexpr,
                        PACK: tl.constexpr, BLOCK: tl.constexpr):
        """One program per (b, s): the row's valid indices (``0 <= idx < row_end``, kept by the mask), in
        their order, packed at the front of ``c_ptr[row]``; their count in ``n_ptr[row]``.  DEDUP: a key
        repeated in the row is packed once: ``seen_ptr`` is a zeroed bitmap of ``W = ceil(T / 32)`` words
        per row (bit ``j % 32`` of word ``j // 32`` for key ``j``), and of the lanes that set a key's bit
        (``atomic_or``) only the one that found it clear keeps it.  PACK False (with DEDUP): the bitmap of
        the row's valid keys is the only result (the per-head masked flash path's selection bits)."""
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
                bit = 1 << (idx & 31).to(tl.int32)  # (relaxed: atomic, no ordering with other memory needed)
                prev = tl.atomic_or(seen_ptr + row * W + (idx >> 5), bit, mask=valid, sem="relaxed")
                valid = valid & ((prev & bit) == 0)
            if PACK:
                pos = n + tl.cumsum(valid.to(tl.int32), 0) - 1
                tl.store(c_ptr + row * K + pos, idx.to(tl.int32), mask=valid)
                n += tl.sum(valid.to(tl.int32), 0)
        if PACK:
            tl.store(n_ptr + row, n)

    @triton.jit
    def _load_q(q_rows, live, D, DA: tl.constexpr, DB: tl.constexpr):
        """Query rows ``q_rows`` ([R, 1] pointers; rows with ``live`` False read as 0) split as the Dqk dot is:
        columns ``da = [0, DA)`` (a power of two) and ``db = DA + [0, DB)`` (the rest; ``da`` and the same
        values again when DB == 0).  Returns ``(da, db, q_a, q_b)``."""
        da = tl.arange(0, DA)
        q_a = tl.load(q_rows + da[None, :], mask=live[:, None] & (da[None, :] < D), other=0.0)
        if DB > 0:
            db = DA + tl.arange(0, DB)
            q_b = tl.load(q_rows + db[None, :], mask=live[:, None] & (db[None, :] < D), other=0.0)
        else:
            db = da
            q_b = q_a
        return da, db, q_a, q_b

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
    def _qk_tile(q_a, q_b, k_rows, kmask, da, db, D: tl.constexpr, DB: tl.constexpr, PREC: tl.constexpr,
                 UPCAST: tl.constexpr):
        """``q k^T`` [rows, keys] in fp32 on tensor cores, Dqk split DA + DB, for the key rows at pointers
        ``k_rows`` (read where ``kmask``, else 0); also returns the first DA columns of the keys (MLA's V)."""
        k_a = tl.load(k_rows[:, None] + da[None, :], mask=kmask[:, None] & (da[None, :] < D), other=0.0)
        qk = tl.dot(_up(q_a, UPCAST), tl.trans(_up(k_a, UPCAST)), input_precision=PREC)
        if DB > 0:
            k_b = tl.load(k_rows[:, None] + db[None, :], mask=kmask[:, None] & (db[None, :] < D), other=0.0)
            qk = tl.dot(_up(q_b, UPCAST), tl.trans(_up(k_b, UPCAST)), qk, input_precision=PREC)
        return qk, k_a

    @triton.jit
    def _softmax_pv(qk, vt, m_i, l_i, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
        """One online-softmax step (fp32, exp2) over a tile of masked logits ``qk`` [rows, keys] in log2
        units (-inf = no key), then ``acc += round(P) V`` on tensor cores (P rounded to V's dtype)."""
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(qk - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(_up(p.to(vt.dtype), UPCAST), _up(vt, UPCAST), acc * alpha[:, None], input_precision=PREC)
        return m_new, l_i, acc

    @triton.jit
    def _mla_tile(q_a, q_b, kb, ks_t, vb, vs_t, idx, valid, da, db, dvv, m_i, l_i, acc, scale_log2,
                  D: tl.constexpr, DV: tl.constexpr, DB: tl.constexpr, V_IS_KA: tl.constexpr, PREC: tl.constexpr,
                  UPCAST: tl.constexpr):
        """One gathered tile: S = q k^T (Dqk split DA + DB), online softmax (exp2), acc += P V."""
        qk, k_a = _qk_tile(q_a, q_b, kb + idx * ks_t, valid, da, db, D, DB, PREC, UPCAST)
        qk = tl.where(valid[None, :], qk * scale_log2, float("-inf"))
        if V_IS_KA:
            vt = k_a  # MLA: V is the first dv = DA columns of the latent rows just loaded
        else:
            vt = tl.load((vb + idx * vs_t)[:, None] + dvv[None, :], mask=valid[:, None] & (dvv[None, :] < DV),
                         other=0.0)
        return _softmax_pv(qk, vt, m_i, l_i, acc, PREC, UPCAST)

    @triton.jit
    def _finish(acc, m_i, l_i, heads, hmask, sink_ptr, fill_row, fs_h, dvv, DV: tl.constexpr,
                HAS_SINK: tl.constexpr, EMPTY_ROW: tl.constexpr):
        """acc / l, with the sink's share of the denominator, or the empty-row value.  Every argument already
        broadcasts against ``acc`` (a row's m_i, l_i, head and mask as a column [rows, 1], ``dvv`` [1, DVP];
        or scalars and a 1-d ``acc``), so no operand changes layout here."""
        if HAS_SINK:
            sink = tl.load(sink_ptr + heads, mask=hmask, other=0.0).to(tl.float32) * 1.4426950408889634
            m_f = tl.maximum(m_i, sink)
            alpha = tl.exp2(m_i - m_f)
            l_f = l_i * alpha + tl.exp2(sink - m_f)
            out = acc * (alpha / l_f)
        else:
            empty = l_i == 0.0
            out = acc / tl.where(empty, 1.0, l_i)
            if EMPTY_ROW == 0:
                out = tl.where(empty, float("nan"), out)
            elif EMPTY_ROW == 2:
                # (a where, not `&`: Triton 3.9's interpreter cannot `&` a scalar with a block)
                fill = tl.load(fill_row + heads * fs_h + dvv, mask=tl.where(empty & hmask, dvv < DV, False), other=0.0)
                out = tl.where(empty, fill, out)
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
        S, T, K, H, scale_log2, REP,
        D: tl.constexpr, DV: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, DVP: tl.constexpr,
        HAS_ENDS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SINK: tl.constexpr, EMPTY_ROW: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """Per-head keys, the gather form (no dedup: a repeated index counts twice): one program per (b, s, h),
        vector reductions.  The host passes one tile width (DA = DVP, and DB = DA when Dqk > DA), so the k and
        v tiles share one layout; the logits stay 1-d (the layout of the row sums) and the running max and
        sum are scalars, so no value changes layout in the loop.  (Expanding the row sums to ``[1, BLOCK_K]``
        went through shared memory, where the lanes that hold one sum, possibly rounded differently, all wrote
        it to one slot: racecheck's WAW hazard, as in triton-lang/triton#7264.)  With ``MHA_WARPS = 1`` no
        layout change leaves the warp."""
        row = tl.program_id(0).to(tl.int64)
        b = row // S
        s = row % S
        h = tl.program_id(1)
        kvh = h // REP
        da = tl.arange(0, DA)
        q_row = q_ptr + b * qs_b + s * qs_s + h * qs_h
        q_a = tl.load(q_row + da, mask=da < D, other=0.0).to(tl.float32)
        if DB > 0:
            db = DA + tl.arange(0, DB)
            q_b = tl.load(q_row + db, mask=db < D, other=0.0).to(tl.float32)
        end = _row_end(re_ptr, res_b, res_s, b, s, T, HAS_ENDS)
        kb = k_ptr + b * ks_b + kvh * ks_h
        vb = v_ptr + b * vs_b + kvh * vs_h
        dvv = tl.arange(0, DVP)
        m_i = tl.full((), float("-inf"), tl.float32)
        l_i = tl.full((), 0.0, tl.float32)
        acc = tl.zeros((DVP,), tl.float32)
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
            qk = tl.where(valid, qk * scale_log2, float("-inf"))  # [BLOCK_K]
            m_new = tl.maximum(m_i, tl.max(qk, 0))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(qk - m_use)
            l_i = l_i * alpha + tl.sum(p, 0)
            vt = tl.load((vb + idx * vs_t)[:, None] + dvv[None, :], mask=valid[:, None] & (dvv[None, :] < DV),
                         other=0.0)
            acc = acc * alpha + tl.sum(p.to(vt.dtype).to(tl.float32)[:, None] * vt.to(tl.float32), 0)  # [DVP]
            m_i = m_new
        out = _finish(acc, m_i, l_i, h, h < H, sink_ptr, fill_ptr + b * fs_b, fs_h, dvv, DV, HAS_SINK, EMPTY_ROW)
        tl.store(o_ptr + b * os_b + s * os_s + h * os_h + dvv, out.to(o_ptr.dtype.element_ty), mask=dvv < DV)

    @triton.jit(do_not_specialize=["S", "NT"])
    def _tile_list_kernel(bits_ptr, W, S, NT, tiles_ptr, cnt_ptr, BLOCK_M: tl.constexpr, NW: tl.constexpr,
                          CHUNK: tl.constexpr):
        """One program per cell (b, block of BLOCK_M query rows), ``cell = b * cdiv(S, BLOCK_M) + block``: the
        key tiles of ``BLOCK_N = 32 * NW`` keys (NT in all) in which some row of the block has a selection bit,
        ascending, at ``tiles_ptr[cell * NT:]``; their count at ``cnt_ptr[cell]``.  ``bits_ptr``: the
        ``[B * S, W]`` selection bitmask."""
        cell = tl.program_id(0).to(tl.int64)
        nblk = tl.cdiv(S, BLOCK_M)
        b = cell // nblk
        rows = (cell % nblk) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_words = bits_ptr + (b * S + rows) * W
        rmask = rows < S
        w = tl.arange(0, NW)
        n = 0
        for t0 in range(0, NT, CHUNK):
            tiles = t0 + tl.arange(0, CHUNK)
            word = tiles[None, :, None] * NW + w[None, None, :]  # [1, CHUNK, NW]; >= W past the last tile
            x = tl.load(row_words[:, None, None] + word, mask=rmask[:, None, None] & (word < W), other=0)
            hit = tl.max(tl.max((x != 0).to(tl.int32), 2), 0)  # [CHUNK]
            pos = n + tl.cumsum(hit, 0) - 1
            tl.store(tiles_ptr + cell * NT + pos, tiles, mask=hit != 0)
            n += tl.sum(hit, 0)
        tl.store(cnt_ptr + cell, n)

    @triton.jit(do_not_specialize=["S", "T", "NT"])
    def _masked_flash_kernel(
        q_ptr, qs_b, qs_s, qs_h,
        k_ptr, ks_b, ks_t, ks_h,
        v_ptr, vs_b, vs_t, vs_h,
        bits_ptr, W, tiles_ptr, cnt_ptr, NT,
        sink_ptr, fill_ptr, fs_b, fs_h,
        o_ptr, os_b, os_s, os_h,
        S, T, H, REP, scale_log2,
        D: tl.constexpr, DV: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, DVP: tl.constexpr,
        V_IS_KA: tl.constexpr, HAS_SINK: tl.constexpr, EMPTY_ROW: tl.constexpr, PREC: tl.constexpr,
        UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """Per-head keys with dedup: dense-tile masked flash attention.  One program per (block of BLOCK_M
        query rows, b, h), the blocks of one (b, h) in a row, the last (longest under a causal bound) first.
        It walks only the key tiles that ``_tile_list_kernel`` listed for its block (branch-free, so Triton
        pipelines the loads), reads each [BLOCK_N, Dqk] k tile and [BLOCK_N, Dv] v tile of kv head
        ``h // REP`` once for all BLOCK_M queries, ``q k^T`` and ``P V`` on tensor cores, and masks the logits
        with the rows' selection bits (which already hold range, ``row_ends``, ``keep_mask`` and dedup)."""
        pid = tl.program_id(0)
        nblk = tl.cdiv(S, BLOCK_M)
        bh = pid // nblk
        blk = nblk - 1 - pid % nblk
        b = (bh // H).to(tl.int64)
        h = bh % H
        kvh = h // REP
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < S
        da, db, q_a, q_b = _load_q(q_ptr + b * qs_b + rows[:, None].to(tl.int64) * qs_s + h * qs_h, rmask, D, DA, DB)
        kb = k_ptr + b * ks_b + kvh * ks_h
        vb = v_ptr + b * vs_b + kvh * vs_h
        bit_rows = bits_ptr + (b * S + rows) * W
        dvv = tl.arange(0, DVP)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, DVP), tl.float32)
        cell = b * nblk + blk
        n_tiles = tl.load(cnt_ptr + cell)
        for i in range(0, n_tiles):
            w0 = tl.load(tiles_ptr + cell * NT + i) * (BLOCK_N // 32)  # the tile's first bitmask word
            keys = w0 * 32 + tl.arange(0, BLOCK_N)
            kmask = keys < T
            # each row's BLOCK_N // 32 words, one [BLOCK_M] load each, spread over the tile's keys in registers
            word = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
            for c in tl.static_range(BLOCK_N // 32):
                wc = tl.load(bit_rows + w0 + c, mask=tl.where(w0 + c < W, rmask, False), other=0)
                word = tl.where((tl.arange(0, BLOCK_N) // 32 == c)[None, :], wc[:, None], word)
            sel = ((word >> (keys & 31)[None, :]) & 1) != 0  # [BLOCK_M, BLOCK_N]: row s selects key j
            qk, k_a = _qk_tile(q_a, q_b, kb + keys.to(tl.int64) * ks_t, kmask, da, db, D, DB, PREC, UPCAST)
            qk = tl.where(sel, qk * scale_log2, float("-inf"))
            if V_IS_KA:
                vt = k_a  # v = k[..., :dv] with dv = DA
            else:
                vt = tl.load((vb + keys.to(tl.int64) * vs_t)[:, None] + dvv[None, :],
                             mask=kmask[:, None] & (dvv[None, :] < DV), other=0.0)
            m_i, l_i, acc = _softmax_pv(qk, vt, m_i, l_i, acc, PREC, UPCAST)
        heads = h + tl.zeros((BLOCK_M, 1), tl.int32)
        out = _finish(acc, m_i[:, None], l_i[:, None], heads, rmask[:, None], sink_ptr, fill_ptr + b * fs_b, fs_h,
                      dvv[None, :], DV, HAS_SINK, EMPTY_ROW)
        o_rows = o_ptr + b * os_b + rows[:, None].to(tl.int64) * os_s + h * os_h
        tl.store(o_rows + dvv[None, :], out.to(o_ptr.dtype.element_ty), mask=rmask[:, None] & (dvv[None, :] < DV))


def _last_contiguous(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _index_args(idx, row_ends, keep_mask, t):
    """The index, ``row_ends`` and ``keep_mask`` kernel arguments (pointer, strides); an absent tensor is replaced
    by ``idx`` (never read: HAS_ENDS / HAS_MASK are off)."""
    b, s = idx.shape[:2]
    re = row_ends.expand(b, s) if row_ends is not None else idx
    mk = keep_mask.expand(b, s, t) if keep_mask is not None else idx
    return (idx, idx.stride(0), idx.stride(1), idx.stride(2), re, re.stride(0), re.stride(1),
            mk, mk.stride(0), mk.stride(1), mk.stride(2))


def _select_keys(idx, row_ends, keep_mask, t, dedup, packed, counts, seen):
    """``_compact_kernel`` over each row of ``idx`` [B, S, K]: pack (``packed`` not None) and/or set ``seen``."""
    b, s, kk = idx.shape
    _compact_kernel[(b * s,)](*_index_args(idx, row_ends, keep_mask, t), packed if packed is not None else seen,
                              counts if counts is not None else seen, seen, cdiv(t, 32), s, t, kk,
                              HAS_ENDS=row_ends is not None, HAS_MASK=keep_mask is not None, DEDUP=dedup,
                              PACK=packed is not None, BLOCK=min(max(16, next_pow2(kk)), 4096),
                              num_warps=4)


def _bitmap(b, s, t, device):
    """Zeroed ``[B * S, ceil(T / 32)]`` int32 words, flat (at least one, so that the pointer is never null)."""
    return torch.zeros(max(b * s * cdiv(t, 32), 1), dtype=torch.int32, device=device)


def selection_tiles(topk_indices, t, row_ends=None, keep_mask=None, block_m=FLASH_BLOCK_M, block_n=FLASH_BLOCK_N):
    """The masked flash path's pre-passes over ``topk_indices`` [B, S, K] (int32/int64, CUDA or interpreter):

    * ``bits``: ``[B * S * ceil(T / 32)]`` int32, flat: bit ``j % 32`` of word ``j // 32`` of row ``b * S + s``
      is set when that row selects a valid key ``j`` (see the module docstring; a repeated index sets one bit);
    * ``tiles`` ``[B * cdiv(S, block_m) * cdiv(T, block_n)]`` int32 and ``counts`` ``[B * cdiv(S, block_m)]``
      int32: for each cell (b, block of ``block_m`` query rows), ascending, the key tiles (``block_n`` keys
      each) holding a bit of some row of the block, ``counts[cell]`` of them from ``tiles[cell * cdiv(T,
      block_n)]`` on.  The flash kernel walks only those tiles.

    ``block_m`` must be a power of two and ``block_n`` a power of two >= 32 (ValueError otherwise).
    """
    bm, bn = block_m, block_n
    if bn < 32 or bn & (bn - 1) or bm < 1 or bm & (bm - 1):
        raise ValueError(f"sparse_attention: `block_m` ({bm}) must be a power of two and `block_n` ({bn}) a power "
                         "of two >= 32")
    b, s = topk_indices.shape[:2]
    dev = topk_indices.device
    bits = _bitmap(b, s, t, dev)
    _select_keys(topk_indices, row_ends, keep_mask, t, True, None, None, bits)
    nblk, nt = cdiv(s, bm), cdiv(t, bn)
    tiles = torch.empty(max(b * nblk * nt, 1), dtype=torch.int32, device=dev)
    counts = torch.empty(b * nblk, dtype=torch.int32, device=dev)
    if counts.numel():
        _tile_list_kernel[(b * nblk,)](bits, cdiv(t, 32), s, nt, tiles, counts, BLOCK_M=bm, NW=bn // 32,
                                       CHUNK=max(1, min(next_pow2(max(nt, 1)), 4096 * 32 // (bm * bn))),
                                       num_warps=4)
    return bits, tiles, counts


def sparse_attention_triton(q, k, v, topk_indices, row_ends=None, keep_mask=None, attn_sink=None, scale=1.0,
                            dv=None, empty_row=EMPTY_NAN, dedup=False, out_dtype=None,
                            block_h=None, block_k=None, num_warps=None, num_stages=None, compact=None,
                            block_m=None, block_n=None):
    """Run the Triton kernels (the op's CUDA path; tests and tuning call it directly).

    Paths: Hk = 1, the shared-latent kernel (``block_h`` heads per program, ``block_k`` keys per tile,
    ``compact``: pack each row's valid indices first, default ``COMPACT``); Hk > 1 with ``dedup``, the masked
    flash kernel (``block_m`` query rows per program, ``block_n`` keys per tile, a power of two >= 32);
    Hk > 1 without ``dedup``, the per-head gather kernel (``block_k``).  ``num_warps`` and ``num_stages``
    apply to the path taken.  All are tunables (defaults: the module's constants); tests shrink them so
    that several tiles run under ``TRITON_INTERPRET=1``.

    Raises:
        ValueError / TypeError as the op; ValueError for a ``block_m`` that is not a power of two or a
        ``block_n`` that is not one >= 32, and on a GPU for a flash tile Triton 3.6 miscompiles
        (``host.refuse_miscompiled_tile``: >= 64 x >= 64 with 4 warps).
    """
    if triton is None:
        raise RuntimeError("sparse_attention: triton is not installed")
    out_dtype = out_dtype or q.dtype
    dv = v.shape[-1] if v is not None else dv
    by_metadata(_check_args, q, k, v, topk_indices, row_ends, keep_mask, attn_sink, scale, dv, empty_row, out_dtype)
    b, s, h, d = q.shape
    t, hk = k.shape[1], k.shape[2]
    kk = topk_indices.shape[-1]
    out = q.new_empty(b, s, h, dv, dtype=out_dtype)
    if out.numel() == 0:
        return out
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    idx = topk_indices
    compact = COMPACT if compact is None else compact
    if dedup and hk == 1 and not compact:  # (the packing kernel and the selection bitmask drop repeats themselves)
        idx = torch.where(_repeated(idx.long()), -1, idx)
    da, db, dvp = _dims(d, dv)
    vt = k if v is None else v
    sink = attn_sink if attn_sink is not None else q
    if empty_row == EMPTY_UNIFORM and attn_sink is None:
        fill = vt[..., :dv].float().mean(dim=1)  # [B, Hk, Dv]: eager's uniform weights over all T keys
        fill = fill.expand(b, h, dv) if hk == 1 else fill.repeat_interleave(h // hk, dim=1)  # [B, H, Dv]
    else:
        fill = q.new_zeros(1, 1, 1, dtype=torch.float32)
    scale_log2 = float(scale) * _LOG2E
    upcast = q.dtype != torch.float32 and os.environ.get("TRITON_INTERPRET") == "1"
    prec = "ieee" if q.dtype == torch.float32 or upcast else "tf32"
    idx_args = _index_args(idx, row_ends, keep_mask, t)
    tail_args = (sink, fill, fill.stride(0), fill.stride(1), out, out.stride(0), out.stride(1), out.stride(2))
    flags = dict(HAS_ENDS=row_ends is not None, HAS_MASK=keep_mask is not None)
    common = dict(HAS_SINK=attn_sink is not None, EMPTY_ROW=int(empty_row), D=d, DV=dv, DA=da, DB=db, DVP=dvp)
    if hk == 1:
        bh = block_h or BLOCK_H
        bh = max(16, min(bh, next_pow2(h)))
        if compact:
            packed = torch.empty(b * s, kk, dtype=torch.int32, device=q.device)
            counts = torch.empty(b * s, dtype=torch.int32, device=q.device)
            # the dedup bitmap (without dedup the kernel never touches it: counts stands in as the pointer)
            _select_keys(idx, row_ends, keep_mask, t, dedup, packed, counts,
                         _bitmap(b, s, t, q.device) if dedup else counts)
        else:
            packed = counts = idx
        _sparse_mla_kernel[(b * s, cdiv(h, bh))](
            q, q.stride(0), q.stride(1), q.stride(2), k, k.stride(0), k.stride(1), vt, vt.stride(0), vt.stride(1),
            *idx_args, *tail_args, s, t, kk, h, scale_log2, packed, counts, V_IS_KA=v is None and dv == da,
            PREC=prec, UPCAST=upcast, BLOCK_H=bh, BLOCK_K=block_k or BLOCK_K, COMPACT=compact,
            num_warps=num_warps or NUM_WARPS, num_stages=num_stages or (COMPACT_STAGES if compact else NUM_STAGES),
            **flags, **common)
    elif dedup:
        narrow = q.dtype != torch.float32 and da + db <= 256 and dvp <= 256
        dm, dn, dwarps, dstages = (FLASH_BLOCK_M, FLASH_BLOCK_N, FLASH_WARPS, FLASH_STAGES) if narrow else FLASH_WIDE
        if narrow and da + db + dvp > 320:
            dn = FLASH_BLOCK_N_WIDE
        bm, bn = block_m or dm, block_n or dn
        if bm > 0 and not bm & (bm - 1):  # (else selection_tiles raises)
            bm = max(16, min(bm, next_pow2(s)))  # no taller than the queries (a tl.dot needs 16)
        warps = num_warps or dwarps
        if os.environ.get("TRITON_INTERPRET") != "1":
            refuse_miscompiled_tile("sparse_attention", bm, bn, warps)
        bits, tiles, counts = selection_tiles(idx, t, row_ends, keep_mask, bm, bn)
        nt = cdiv(t, bn)
        _masked_flash_kernel[(b * h * cdiv(s, bm),)](
            q, q.stride(0), q.stride(1), q.stride(2), k, k.stride(0), k.stride(1), k.stride(2),
            vt, vt.stride(0), vt.stride(1), vt.stride(2), bits, cdiv(t, 32), tiles, counts, nt, *tail_args,
            s, t, h, h // hk, scale_log2, V_IS_KA=v is None and dv == da, PREC=prec, UPCAST=upcast,
            BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=num_stages or dstages,
            **common)
    else:
        dw = max(da, dvp)  # one tile width for k and v (see the kernel)
        _sparse_mha_kernel[(b * s, h)](
            q, q.stride(0), q.stride(1), q.stride(2), k, k.stride(0), k.stride(1), k.stride(2),
            vt, vt.stride(0), vt.stride(1), vt.stride(2), *idx_args, *tail_args, s, t, kk, h, scale_log2, h // hk,
            BLOCK_K=block_k or MHA_BLOCK_K, num_warps=num_warps or MHA_WARPS, **flags,
            **dict(common, DA=dw, DB=dw if d > dw else 0, DVP=dw))
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
        k: ``[B, T, Hk, Dqk]``, Hk = 1 (MLA latent shared by all heads), H, or dividing H (GQA); q's dtype.
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
