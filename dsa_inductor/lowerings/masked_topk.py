"""``dsa_inductor::masked_topk``: top-k over a row range or mask, without a masked copy of the logits.

Idiom (DeepSeek-V3.2 DSA indexer, transformers' ``DeepseekV32Indexer``, vLLM/SGLang indexer prefill)::

    index_scores = index_scores.masked_fill(~attention_mask, float("-inf"))   # or + additive mask,
    topk_indices = index_scores.topk(min(index_topk, T), dim=-1).indices      # or an arange range mask

Semantics: ``torch.topk(where(keep, logits (+ bias), fill), k, dim=-1, largest=True, sorted=sorted)``
where ``keep`` is the conjunction of the given pieces:

* ``row_starts[..., None] <= arange(N) < row_ends[..., None]`` (either bound optional);
* ``mask`` (``mask_keeps=True``: True keeps the position; ``False``: True drops it).

Masked positions take the value ``fill`` rounded to the result dtype, exactly as ``masked_fill`` /
``torch.where`` give them; a row with fewer than ``k`` kept positions is padded with masked positions,
as eager pads it.  Indices are valid positions in ``[0, N)``; ties may pick other indices than eager.
NaN ranks above +inf (``torch.topk``'s order, on CPU and CUDA); among equal values (several NaNs, -inf
fill included) which indices are picked is unspecified, in eager too.  The contract is
``dsa_inductor.testing.topk_mismatch``.

CUDA path (``masked_topk_triton``; ``_auto_impl`` picks the design: v5 for rows that fit one program, v7
for longer rows of decode-sized batches; ``impl=`` forces one).
v5, rows of at most ``BLOCK_MAX`` positions: one program per row (longest causal rows first) holds only
the row's order-preserving uint32 keys in registers, loading only kept positions (for range rows only
``[row_start, row_end)``, in a register block of the size the range needs) and never writing a masked
copy, and bisects the k-th largest key (one or two bits per block reduction, stopping once exactly k
keys share the decided prefix).  After those registers are dead it re-reads the row in tiles and writes
the winners with a running output offset (one packed prefix scan per tile; ties lowest position first,
as PyTorch's CUDA ``gatherTopK`` takes them), so about half the registers of v4 are live and twice as
many programs fit on an SM.  Longer rows (decode) are split over chunk programs: radix passes of 8 key
bits each add per-chunk histograms into a per-row global histogram with atomics, every later program
replays the decided digits from those histograms, and a chunked compaction reserves output slots with
a per-row atomic counter (fixed launch sizes, no host sync: CUDA-graph safe).  A range row with at most
``k`` kept positions and ``fill == -inf`` short-circuits: its selection is every in-range position plus
padding.  v7, longer rows (decode: a few rows of 64K-2M positions, k much smaller): a bound, a filter and
a resolve launch.  Each chunk program bisects its chunk's keys toward its share of k (times an oversampling
factor) and records every round's (threshold, exact count at or above it); the filter takes as the row's
bound the highest recorded threshold at which the chunks together hold k keys (so it cannot exceed the k-th
key) and appends every key at or above it to a per-row candidate list; one program per row selects the
exact top k of those candidates in registers (a few thousand for scores that do not rise with the position),
or, when the list overflows, streams the row itself.  ``sorted=True`` orders the winners afterwards with
``torch.sort`` on their values.  v4: the
row in registers, a banded two-phase bisection and one compaction scan, chunk + merge stages for long
rows.  The key transform and select-then-compact structure follow the radix top-k kernels written for
the DSA indexer (SGLang's and vLLM's DeepSeek-V3.2 ``topk``, FlashInfer's radix top-k);
bench/NOTES.md has the measurements.

CPU path: plain torch (what eager computes); the compiled graph calls the op as an extern kernel, so
these torch ops run eagerly inside it (Inductor does not trace into the op).
"""

from __future__ import annotations

import functools
import math
import typing
from typing import Optional

import torch

from .host import broadcast_shapes, by_metadata, cdiv, next_pow2
from .registry import fused_op

from ..testing import topk_mismatch  # noqa: F401  (the equivalence contract; re-exported)

try:  # triton is optional on CPU-only installs; the CPU path never needs it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None

OP_NAME = "dsa_inductor::masked_topk"
VERIFY = False  # set by register_dsa_passes(verify=True): check each CUDA call against eager
BLOCK_MAX = 16384  # most positions (or candidates) one program holds in registers


def _check_args(logits, k, row_starts, row_ends, mask, bias, index_dtype):
    """Raise ValueError/TypeError naming the offending argument."""
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1:
        raise ValueError("masked_topk: `logits` must be a tensor with at least 1 dimension")
    if not logits.dtype.is_floating_point or logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"masked_topk: `logits` must be float32, float16 or bfloat16, got {logits.dtype}")
    n = logits.shape[-1]
    torch._check_value(k >= 0, lambda: f"masked_topk: `k` must be >= 0, got {k}")
    torch._check_value(k <= n, lambda: f"masked_topk: `k` ({k}) is larger than the last dim of `logits` ({n})")
    for name, t in (("row_starts", row_starts), ("row_ends", row_ends)):
        if t is None:
            continue
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"masked_topk: `{name}` must be int32 or int64, got {t.dtype}")
        if t.device != logits.device:
            raise ValueError(f"masked_topk: `{name}` is on {t.device}, `logits` on {logits.device}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"masked_topk: `mask` must be bool, got {mask.dtype}")
        if mask.device != logits.device or mask.dim() < 1:
            raise ValueError("masked_topk: `mask` must be a >=1-d bool tensor on the device of `logits`")
    if bias is not None:
        if not bias.dtype.is_floating_point:
            raise TypeError(f"masked_topk: `bias` must be floating point, got {bias.dtype}")
        if bias.device != logits.device or bias.dim() < 1:
            raise ValueError("masked_topk: `bias` must be a >=1-d tensor on the device of `logits`")
    if index_dtype not in (torch.int32, torch.int64):
        raise TypeError(f"masked_topk: `index_dtype` must be torch.int32 or torch.int64, got {index_dtype}")
    for name, t in (("mask", mask), ("bias", bias)):
        if t is not None and _known_differ(t.shape[-1], n) and _known_differ(t.shape[-1], 1):
            raise ValueError(f"masked_topk: `{name}` has last dim {t.shape[-1]}, `logits` has {n} (or 1 to broadcast)")
    _check_rows_broadcast("masked_topk", "logits", logits.shape[:-1],
                          (("row_starts", row_starts, False), ("row_ends", row_ends, False), ("mask", mask, True),
                           ("bias", bias, True)))


def _known_differ(a, b) -> bool:
    """Sizes known to differ (a symbolic size under tracing is checked again on the real call)."""
    return isinstance(a, int) and isinstance(b, int) and a != b


def _check_rows_broadcast(op, base_name, rows, parts):
    """Each of ``parts`` ((name, tensor or None, has a last position dim)) broadcasts with the rows; raise
    ValueError naming the first that does not."""
    shape = tuple(rows)
    for name, t, positional in parts:
        if t is None:
            continue
        own = tuple(t.shape[:-1] if positional else t.shape)
        try:
            shape = tuple(broadcast_shapes(shape, own))
        except RuntimeError:
            raise ValueError(f"{op}: `{name}` ({'rows' if positional else 'shape'} {own}) does not broadcast with "
                             f"the rows {shape} of `{base_name}`") from None


def _checked_batch(logits, k, row_starts, row_ends, mask, bias, index_dtype) -> tuple:
    """``_check_args`` (raising on a bad argument), then the batch shape."""
    _check_args(logits, k, row_starts, row_ends, mask, bias, index_dtype)
    return _batch_shape(logits, row_starts, row_ends, mask, bias)


def _result_dtype(logits, bias):
    return logits.dtype if bias is None else torch.promote_types(logits.dtype, bias.dtype)


def _batch_shape(logits, row_starts, row_ends, mask, bias):
    shapes = [logits.shape[:-1]]
    shapes += [t.shape for t in (row_starts, row_ends) if t is not None]
    shapes += [t.shape[:-1] for t in (mask, bias) if t is not None]
    return broadcast_shapes(*shapes)


def masked_logits(logits, row_starts=None, row_ends=None, mask=None, mask_keeps=True, bias=None,
                  fill=float("-inf")):
    """``where(keep, logits (+ bias), fill)`` broadcast to ``(*batch, N)``: the tensor eager runs topk on."""
    x = logits if bias is None else logits + bias
    n = x.shape[-1]
    keep = None
    if row_starts is not None or row_ends is not None:
        pos = torch.arange(n, device=x.device)
        if row_starts is not None:
            keep = pos >= row_starts.unsqueeze(-1)
        if row_ends is not None:
            before_end = pos < row_ends.unsqueeze(-1)
            keep = before_end if keep is None else keep & before_end
    if mask is not None:
        m = mask if mask_keeps else ~mask
        keep = m if keep is None else keep & m
    if keep is not None:
        x = torch.where(keep, x, torch.tensor(fill, dtype=x.dtype, device=x.device))
    return x.expand(*_batch_shape(logits, row_starts, row_ends, mask, bias), n)


def masked_topk_reference(logits, k, row_starts=None, row_ends=None, mask=None, mask_keeps=True,
                          bias=None, fill=float("-inf"), sorted=True, index_dtype=torch.int64,
                          need_values=True):
    """Plain-torch definition of the op (its CPU path, and the oracle of every test)."""
    x = masked_logits(logits, row_starts, row_ends, mask, mask_keeps, bias, fill)
    values, indices = torch.topk(x, k, dim=-1, largest=True, sorted=sorted)
    if not need_values:
        values = values.new_empty(*values.shape[:-1], 0)
    return values, indices.to(index_dtype)


@functools.lru_cache(maxsize=64)
def _round_to(fill: float, dtype: torch.dtype) -> float:
    """``fill`` as ``masked_fill`` / ``full(dtype=dtype)`` store it (host-side, outside any tracing mode)."""
    with torch._C._DisableTorchDispatch():
        return torch.tensor(float(fill), dtype=dtype).item()


def _rows3(t, batch, last):
    """``t`` broadcast to ``(*batch, last)`` as an [A, S, last] row array: ``(tensor, (stride_a, stride_s,
    stride_last))``.  The strides are computed from ``t``'s own (0 along broadcast dims; the batch dims before the
    last merged into A) with no view made, which costs host time on every call; only batch dims that no single
    stride can walk (a permuted batch) are copied, as ``reshape`` would.  The tensor's data pointer is ``t``'s."""
    nb = len(batch)
    full = [0] * (nb + 1)  # per dim of (*batch, last): t's stride, 0 where t broadcasts (or has size 1)
    off = nb + 1 - t.dim()
    for i, (size, stride) in enumerate(zip(t.shape, t.stride())):
        if size != 1:
            full[off + i] = stride
    if nb <= 1:
        return t, (0, full[0] if nb else 0, full[nb])
    # A walks the batch dims before the last with one stride when they nest (broadcast ones included: stride 0)
    dims = [(batch[i], full[i]) for i in range(nb - 1) if batch[i] != 1]
    if all(dims[i][1] == dims[i + 1][1] * dims[i + 1][0] for i in range(len(dims) - 1)):
        return t, (dims[-1][1] if dims else 0, full[nb - 1], full[nb])
    t = t.expand(*batch, last).reshape(-1, batch[-1], last)
    return t, tuple(t.stride())


def _row_args(logits, row_starts, row_ends, mask, bias, batch, n):
    """The kernels' leading arguments: logits, row_starts, row_ends, mask and bias as [A, S, .] row arrays with
    their strides (an absent one: ``logits`` stands in, never read), and that stand-in pointer."""
    x, xs = _rows3(logits, batch, n)
    st, sts = _rows3(row_starts.unsqueeze(-1), batch, 1) if row_starts is not None else (x, xs)
    en, ens = _rows3(row_ends.unsqueeze(-1), batch, 1) if row_ends is not None else (x, xs)
    m, ms = _rows3(mask, batch, n) if mask is not None else (x, xs)
    b, bs = _rows3(bias, batch, n) if bias is not None else (x, xs)
    return (x, *xs, st, *sts[:2], en, *ens[:2], m, *ms, b, *bs), x


if triton is not None:

    @triton.jit
    def _sortable_key(v):
        """fp32 -> uint32 key with the order of torch.topk: NaN above +inf, then the usual float order."""
        v = tl.where(v != v, float("nan"), v)
        b = v.to(tl.uint32, bitcast=True)
        return tl.where((b >> 31) != 0, ~b, b | 0x80000000)

    @triton.jit
    def _key_to_value(key, LOW_BIT: tl.constexpr):
        b = tl.where((key >> 31) != 0, key & 0x7FFFFFFF, ~key)
        if LOW_BIT > 0:
            b = (b >> LOW_BIT) << LOW_BIT
        v = b.to(tl.float32, bitcast=True)
        # -inf is the one value whose key was raised (to 1 << LOW_BIT, see _keys_at).
        return tl.where(key <= (1 << LOW_BIT), float("-inf"), v)

    @triton.jit
    def _keys_at(cols, a, s, lo, hi, fill_key,
                 x_ptr, xs0, xs1, xs2, m_ptr, ms0, ms1, ms2, b_ptr, bs0, bs1, bs2,
                 MASK_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_DTYPE: tl.constexpr, LOW_BIT: tl.constexpr):
        """Keys of the (masked, biased) logits at positions ``cols`` of row (a, s); loads only kept ones.

        Bits below LOW_BIT are cleared: for bf16/fp16 values they carry no information (for negative
        values the complement made them all ones).  Every real key is >= 1 << LOW_BIT (only bf16's -inf
        needs raising), so that 0 can stand for "no element"."""
        keep = (cols >= lo) & (cols < hi)
        if MASK_MODE != 0:
            m = tl.load(m_ptr + a * ms0 + s * ms1 + cols * ms2, mask=keep, other=0).to(tl.int1)
            if MASK_MODE == 1:
                keep = keep & m
            else:
                keep = keep & (m == 0)
        x = tl.load(x_ptr + a * xs0 + s * xs1 + cols * xs2, mask=keep, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bb = tl.load(b_ptr + a * bs0 + s * bs1 + cols * bs2, mask=keep, other=0.0).to(tl.float32)
            x = (x + bb).to(OUT_DTYPE).to(tl.float32)
        key = tl.where(keep, _sortable_key(x), fill_key)
        if LOW_BIT > 0:
            key = tl.maximum((key >> LOW_BIT) << LOW_BIT, 1 << LOW_BIT)
        return key

    @triton.jit
    def _kth_key(key, K, t, bit, LOW_BIT: tl.constexpr):
        """Bitwise bisection for the K-th largest of ``key`` (0 marks no element), continuing from a
        threshold ``t`` whose bits above ``bit`` are decided.

        One count ``sum(key >= candidate)`` per bit, down to ``LOW_BIT``; stops early once exactly K keys
        reach the candidate.  Returns ``(t_above, t_equal, remaining)``: every key >= t_above is
        selected, plus the first ``remaining`` keys equal to ``t_equal``.
        """
        done = K * 0
        while (bit >= LOW_BIT) & (done == 0):
            cand = t | (t * 0 + 1) << bit.to(tl.uint32)
            c = tl.sum((key >= cand).to(tl.int32), 0)
            t = tl.where(c >= K, cand, t)
            done = (c == K).to(tl.int32)
            bit -= 1
        if done != 0:
            t_above = t
            remaining = K * 0
        else:
            t_above = t + 1
            remaining = K - tl.sum((key > t).to(tl.int32), 0)
        return t_above, t, remaining

    @triton.jit
    def _kth_key_radix16(key, K, t, bit, LOW_BIT: tl.constexpr):
        """``_kth_key`` deciding 4 bits per round: 16 candidates counted in one [n, 16] reduction.

        For short key vectors (the phase-2 band), where each round's reduction latency, not the
        compares, is the cost."""
        jv = tl.arange(0, 16)
        done = K * 0
        while (bit >= LOW_BIT) & (done == 0):
            sh = tl.maximum(bit - 3, 0)
            cands = t | (jv.to(tl.uint32) << sh.to(tl.uint32))
            valid = jv < (1 << (bit - sh + 1))
            cnt = tl.sum((key[:, None] >= cands[None, :]).to(tl.int32), 0)
            jstar = tl.max(tl.where(valid & (cnt >= K), jv, 0), 0)
            cstar = tl.sum(tl.where(jv == jstar, cnt, 0), 0)
            t = t | (jstar.to(tl.uint32) << sh.to(tl.uint32))
            done = (cstar == K).to(tl.int32)
            bit = sh - 1
        if done != 0:
            t_above = t
            remaining = K * 0
        else:
            t_above = t + 1
            remaining = K - tl.sum((key > t).to(tl.int32), 0)
        return t_above, t, remaining

    @triton.jit
    def _emit(pos, take, key, cols, out, cand, ok_ptr, oi_ptr, val_ptr, idx_ptr,
              FINAL: tl.constexpr, WRITE_VALUES: tl.constexpr, LOW_BIT: tl.constexpr, OUT_DTYPE: tl.constexpr):
        """Store selected (key, position) pairs: the outputs (FINAL) or a chunk's candidate list."""
        if FINAL:
            tl.store(idx_ptr + out + pos, cols, mask=take)
            if WRITE_VALUES:
                tl.store(val_ptr + out + pos, _key_to_value(key, LOW_BIT).to(OUT_DTYPE), mask=take)
        else:
            tl.store(ok_ptr + cand + pos, key.to(tl.int32, bitcast=True), mask=take)
            tl.store(oi_ptr + cand + pos, cols.to(tl.int32), mask=take)

    @triton.jit
    def _select_stage(row, chunk, a, s, lo, hi, base, end, K, C, CHUNK, fill_key,
                      x_ptr, xs0, xs1, xs2, m_ptr, ms0, ms1, ms2, b_ptr, bs0, bs1, bs2,
                      ck_ptr, ci_ptr, ok_ptr, oi_ptr, val_ptr, idx_ptr, sk_ptr, si_ptr,
                      MASK_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, FROM_CANDIDATES: tl.constexpr,
                      FINAL: tl.constexpr, WRITE_VALUES: tl.constexpr, LOW_BIT: tl.constexpr,
                      OUT_DTYPE: tl.constexpr, BLOCK: tl.constexpr, SMALL: tl.constexpr):
        """Top-K of BLOCK lanes (positions base + lane below ``end``, or candidates), keys in registers.

        Phase 1 bisects the K-th key's high bits over all lanes only until at most SMALL keys share the
        decided prefix (the band); keys above the band are selected outright.  Phase 2 copies the band
        (in lane order) to a per-program scratch row and decides the remaining bits over SMALL lanes.
        A band larger than SMALL after every bit is decided is a run of ties: its first lanes are taken.
        """
        lane = tl.arange(0, BLOCK)
        if FROM_CANDIDATES:
            j = base + lane.to(tl.int64)
            exist = (lane < CHUNK) & (j < C)
            exist = exist & (tl.load(ci_ptr + row * C + j, mask=exist, other=-1) >= 0)
            key = tl.load(ck_ptr + row * C + j, mask=exist, other=0).to(tl.uint32, bitcast=True)
        else:
            cols = base + lane.to(tl.int64)
            exist = (lane < CHUNK) & (cols < end)
            key = _keys_at(cols, a, s, lo, hi, fill_key, x_ptr, xs0, xs1, xs2, m_ptr, ms0, ms1, ms2,
                           b_ptr, bs0, bs1, bs2, MASK_MODE, HAS_BIAS, OUT_DTYPE, LOW_BIT)
        key = tl.where(exist, key, 0)
        k_here = tl.minimum(K, tl.sum(exist.to(tl.int32), 0))
        out = row * K
        cand = (row * tl.num_programs(1) + chunk) * K
        if k_here > 0:
            # Phase 1.  Invariant: c_lo = #(key >= t), c_hi = #(key >= t + 2**(bit + 1)), c_hi < K <= c_lo.
            t = tl.max(key, 0) * 0
            c_lo = k_here * 0 + BLOCK
            c_hi = k_here * 0
            bit = k_here * 0 + 31
            while (bit >= LOW_BIT) & ((bit == 31) | ((c_lo - c_hi > SMALL) & (c_lo != k_here))):
                cand_t = t | (t * 0 + 1) << bit.to(tl.uint32)
                c = tl.sum((key >= cand_t).to(tl.int32), 0)
                accept = c >= k_here
                t = tl.where(accept, cand_t, t)
                c_lo = tl.where(accept, c, c_lo)
                c_hi = tl.where(accept, c_hi, c)
                bit -= 1
            shift = (bit + 1).to(tl.uint32)
            band_n = c_lo - c_hi
            need = k_here - c_hi  # keys still to take from the band
            hi_key = key >> shift
            t_s = t >> shift
            above = hi_key > t_s
            band = hi_key == t_s
            # One scan gives both ranks: the above-count in the low 16 bits, the band-count above them.
            packed = above.to(tl.int32) + (band.to(tl.int32) << 16)
            ranks = tl.cumsum(packed, 0) - packed
            band_rank = ranks >> 16
            small = (band_n <= SMALL) & (need != band_n)
            take = above | (band & (band_rank < tl.where(small, 0, need)))
            pos = tl.where(above, ranks & 0xFFFF, c_hi + band_rank)
            # Positions are re-derived here rather than kept live through the search (register budget).
            if FROM_CANDIDATES:
                picked = tl.load(ci_ptr + row * C + base + lane, mask=take, other=0)
            else:
                picked = base.to(tl.int32) + lane  # < N < 2**31
            _emit(pos, take, key, picked, out, cand, ok_ptr, oi_ptr, val_ptr, idx_ptr,
                  FINAL, WRITE_VALUES, LOW_BIT, OUT_DTYPE)
            if small:
                # Phase 2 over the band, in lane order (so ties still go lowest position first).
                scr = (row * tl.num_programs(1) + chunk) * SMALL
                to_scr = band & (band_rank < SMALL)
                tl.store(sk_ptr + scr + band_rank, key.to(tl.int32, bitcast=True), mask=to_scr)
                tl.store(si_ptr + scr + band_rank, lane, mask=to_scr)
                tl.debug_barrier()
                jj = tl.arange(0, SMALL)
                ok = jj < band_n
                key_s = tl.load(sk_ptr + scr + jj, mask=ok, other=0).to(tl.uint32, bitcast=True)
                lane_s = tl.load(si_ptr + scr + jj, mask=ok, other=0)
                t_above, t_equal, remaining = _kth_key_radix16(key_s, need, t, bit, LOW_BIT)
                above_s = ok & (key_s >= t_above)
                equal_s = ok & (key_s == t_equal)
                packed_s = above_s.to(tl.int32) + (equal_s.to(tl.int32) << 16)
                ranks_s = tl.cumsum(packed_s, 0) - packed_s
                eq_rank = ranks_s >> 16
                take_s = above_s | (equal_s & (eq_rank < remaining))
                pos_s = c_hi + tl.where(above_s, ranks_s & 0xFFFF, need - remaining + eq_rank)
                if FROM_CANDIDATES:
                    cols_s = tl.load(ci_ptr + row * C + base + lane_s, mask=take_s, other=0)
                else:
                    cols_s = base.to(tl.int32) + lane_s
                _emit(pos_s, take_s, key_s, cols_s, out, cand, ok_ptr, oi_ptr, val_ptr, idx_ptr,
                      FINAL, WRITE_VALUES, LOW_BIT, OUT_DTYPE)
        if not FINAL:  # unused candidate slots [k_here, K) are marked -1 (K may exceed BLOCK here)
            for start in range(0, K, BLOCK):
                slot = start + lane
                tl.store(oi_ptr + cand + slot, tl.zeros_like(slot) - 1, mask=(slot >= k_here) & (slot < K))

    @triton.jit(do_not_specialize=["S", "N", "K", "C", "CHUNK"])
    def _masked_topk_kernel(
        x_ptr, xs0, xs1, xs2,
        st_ptr, sts0, sts1, en_ptr, ens0, ens1,
        m_ptr, ms0, ms1, ms2,
        b_ptr, bs0, bs1, bs2,
        ck_ptr, ci_ptr,  # candidates in (merge stage): [R, C] keys (uint32 as int32) and positions
        ok_ptr, oi_ptr, val_ptr, idx_ptr,  # candidates out (chunk stage) / final outputs
        sk_ptr, si_ptr,  # phase-2 scratch: SMALL keys and lanes per program
        S, N, K, C, CHUNK, fill,
        HAS_STARTS: tl.constexpr, HAS_ENDS: tl.constexpr, MASK_MODE: tl.constexpr,
        HAS_BIAS: tl.constexpr, RANGE_ONLY: tl.constexpr, FROM_CANDIDATES: tl.constexpr,
        FINAL: tl.constexpr, WRITE_VALUES: tl.constexpr, LOW_BIT: tl.constexpr,
        BLOCK: tl.constexpr, SMALL: tl.constexpr, OUT_DTYPE: tl.constexpr,
    ):
        """One program per (row, chunk); rows run longest-first for causal inputs (last row first).

        RANGE_ONLY (bounds only, fill -inf): lanes cover the row's range [lo, hi) only, in a register
        block of BLOCK, BLOCK/2 or BLOCK/4 lanes as the range needs, and a row with at most K in range
        short-circuits.  Otherwise lanes cover [0, N) (masked positions hold ``fill`` and may be picked).
        Chunk stage: each chunk's top-K candidates.  Merge stage (FROM_CANDIDATES): top-K of a row's C
        candidates, CHUNK per program.  FINAL writes the outputs."""
        row = (tl.num_programs(0) - 1 - tl.program_id(0)).to(tl.int64)
        chunk = tl.program_id(1).to(tl.int64)
        a = row // S
        s = row % S
        N = N.to(tl.int64)
        lo = N * 0
        hi = N
        if HAS_STARTS:
            lo = tl.minimum(tl.maximum(tl.load(st_ptr + a * sts0 + s * sts1).to(tl.int64), 0), N)
        if HAS_ENDS:
            hi = tl.minimum(tl.maximum(tl.load(en_ptr + a * ens0 + s * ens1).to(tl.int64), lo), N)
        n_keep = hi - lo
        fill = tl.cast(fill, tl.float32)  # already rounded to OUT_DTYPE by the caller
        fill_key = _sortable_key(fill)
        if LOW_BIT > 0:
            fill_key = tl.maximum((fill_key >> LOW_BIT) << LOW_BIT, 1 << LOW_BIT)

        short = n_keep < 0
        if RANGE_ONLY:
            short = n_keep <= K
        if short:
            # Every in-range position is selected, then the first masked positions as padding (value
            # fill).  Only the last stage writes it; earlier stages have nothing to do for this row.
            if FINAL:
                _short_row(row, a, s, lo, hi, K, fill, x_ptr, xs0, xs1, xs2, val_ptr, idx_ptr,
                           WRITE_VALUES, OUT_DTYPE, BLOCK)
        else:
            if FROM_CANDIDATES:
                base = chunk * CHUNK
                end = C
            elif RANGE_ONLY:
                base = lo + chunk * CHUNK
                end = hi
            else:
                base = chunk * CHUNK
                end = N
            if RANGE_ONLY and not FROM_CANDIDATES and BLOCK >= 64:
                lanes = tl.minimum(end - base, CHUNK)
                if lanes <= BLOCK // 4:
                    _select_stage(row, chunk, a, s, lo, hi, base, end, K, C, CHUNK, fill_key,
                                  x_ptr, xs0, xs1, xs2, m_ptr, ms0, ms1, ms2, b_ptr, bs0, bs1, bs2,
                                  ck_ptr, ci_ptr, ok_ptr, oi_ptr, val_ptr, idx_ptr, sk_ptr, si_ptr,
                                  MASK_MODE, HAS_BIAS, FROM_CANDIDATES, FINAL, WRITE_VALUES, LOW_BIT,
                                  OUT_DTYPE, BLOCK // 4, SMALL)
                elif lanes <= BLOCK // 2:
                    _select_stage(row, chunk, a, s, lo, hi, base, end, K, C, CHUNK, fill_key,
                                  x_ptr, xs0, xs1, xs2, m_ptr, ms0, ms1, ms2, b_ptr, bs0, bs1, bs2,
                                  ck_ptr, ci_ptr, ok_ptr, oi_ptr, val_ptr, idx_ptr, sk_ptr, si_ptr,
                                  MASK_MODE, HAS_BIAS, FROM_CANDIDATES, FINAL, WRITE_VALUES, LOW_BIT,
                                  OUT_DTYPE, BLOCK // 2, SMALL)
                else:
                    _select_stage(row, chunk, a, s, lo, hi, base, end, K, C, CHUNK, fill_key,
                                  x_ptr, xs0, xs1, xs2, m_ptr, ms0, ms1, ms2, b_ptr, bs0, bs1, bs2,
                                  ck_ptr, ci_ptr, ok_ptr, oi_ptr, val_ptr, idx_ptr, sk_ptr, si_ptr,
                                  MASK_MODE, HAS_BIAS, FROM_CANDIDATES, FINAL, WRITE_VALUES, LOW_BIT,
                                  OUT_DTYPE, BLOCK, SMALL)
            else:
                _select_stage(row, chunk, a, s, lo, hi, base, end, K, C, CHUNK, fill_key,
                              x_ptr, xs0, xs1, xs2, m_ptr, ms0, ms1, ms2, b_ptr, bs0, bs1, bs2,
                              ck_ptr, ci_ptr, ok_ptr, oi_ptr, val_ptr, idx_ptr, sk_ptr, si_ptr,
                              MASK_MODE, HAS_BIAS, FROM_CANDIDATES, FINAL, WRITE_VALUES, LOW_BIT,
                              OUT_DTYPE, BLOCK, SMALL)


    # ------------------------------------------------------------------------------------------------
    # v5: occupancy split.  A row program finds the threshold with only the row's uint32 keys and a few
    # scalars live, then (after those registers are dead) re-reads the row in tiles and compacts the
    # winners with a running offset.  Rows longer than BLOCK_MAX (decode) are split over many programs
    # that build per-row radix histograms in global memory with atomics, then compact with a per-row
    # atomic output counter.  See bench/NOTES.md ("v5").

    @triton.jit
    def _row_bounds(row, S, N, st_ptr, sts0, sts1, en_ptr, ens0, ens1,
                    HAS_STARTS: tl.constexpr, HAS_ENDS: tl.constexpr):
        a = row // S
        s = row % S
        N = N.to(tl.int64)
        lo = N * 0
        hi = N
        if HAS_STARTS:
            lo = tl.minimum(tl.maximum(tl.load(st_ptr + a * sts0 + s * sts1).to(tl.int64), 0), N)
        if HAS_ENDS:
            hi = tl.minimum(tl.maximum(tl.load(en_ptr + a * ens0 + s * ens1).to(tl.int64), lo), N)
        return a, s, lo, hi

    @triton.jit
    def _row_span(lo, hi, N, K, RANGE_ONLY: tl.constexpr):
        """Positions ``[base, end)`` a row's lanes cover, and whether the row is short (its kept positions, at
        most K, are the answer): RANGE_ONLY rows cover [lo, hi), others every position (masked ones hold
        ``fill``)."""
        if RANGE_ONLY:
            base = lo
            end = hi
            short = (hi - lo) <= K
        else:
            base = lo * 0
            end = N.to(tl.int64)
            short = (hi - lo) < 0
        return base, end, short

    @triton.jit
    def _fill_key(fill, LOW_BIT: tl.constexpr):
        fill = tl.cast(fill, tl.float32)  # already rounded to OUT_DTYPE by the caller
        fill_key = _sortable_key(fill)
        if LOW_BIT > 0:
            fill_key = tl.maximum((fill_key >> LOW_BIT) << LOW_BIT, 1 << LOW_BIT)
        return fill_key

    @triton.jit
    def _short_row(row, a, s, lo, hi, K, fill, x_ptr, xs0, xs1, xs2, val_ptr, idx_ptr,
                   WRITE_VALUES: tl.constexpr, OUT_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
        """A range row with at most K kept positions: every kept position, then the first masked
        positions as padding (value fill, -inf here)."""
        lane = tl.arange(0, BLOCK)
        out = row * K
        n_keep = hi - lo
        fill = tl.cast(fill, tl.float32)
        for start in range(lo, hi, BLOCK):
            cols = start + lane
            ok = cols < hi
            tl.store(idx_ptr + out + (cols - lo), cols, mask=ok)
            if WRITE_VALUES:
                x = tl.load(x_ptr + a * xs0 + s * xs1 + cols * xs2, mask=ok, other=0.0)
                x = tl.where(x != x, float("nan"), x)  # every NaN written is the positive one (_sort_descending)
                tl.store(val_ptr + out + (cols - lo), x.to(OUT_DTYPE), mask=ok)
        for start in range(0, K - n_keep, BLOCK):
            j = start + lane
            ok = j < K - n_keep
            tl.store(idx_ptr + out + n_keep + j, tl.where(j < lo, j, j + n_keep), mask=ok)
            if WRITE_VALUES:
                tl.store(val_ptr + out + n_keep + j, tl.zeros_like(j).to(OUT_DTYPE) + fill.to(OUT_DTYPE), mask=ok)

    @triton.jit
    def _add2(a0, b0, a1, b1):
        return a0 + a1, b0 + b1

    @triton.jit
    def _bisect_step(t, sh, two, n1, n2, n3, K, c_lo, c_hi):
        """One round of the 2-bit bisection: counts ``n1..n3`` of keys >= t | j << sh (j = 1..3; n2 = n3 = 0
        when only one bit, ``sh``, is left) decide the bits; returns the new ``(t, c_lo, c_hi)``."""
        n2 = tl.where(two, n2, 0)
        n3 = tl.where(two, n3, 0)
        j = tl.where(n3 >= K, 3, tl.where(n2 >= K, 2, tl.where(n1 >= K, 1, 0)))
        n_j = tl.where(j == 3, n3, tl.where(j == 2, n2, n1))
        n_next = tl.where(j == 0, n1, tl.where(j == 1, n2, n3))
        top = tl.where(two, 3, 1)
        t = t | (j.to(tl.uint32) << sh.to(tl.uint32))
        c_lo = tl.where(j > 0, n_j, c_lo)
        c_hi = tl.where(j == top, c_hi, n_next)
        return t, c_lo, c_hi

    @triton.jit
    def _bisect_keys(key, K, c_lo, STOP: tl.constexpr, BITS: tl.constexpr, rec_ptr=None, REC: tl.constexpr = 0):
        """Bitwise bisection from bit 31 down to bit STOP for the K-th largest of ``key`` (0 marks no
        element), BITS (1 or 2) bits per block reduction: BITS=2 counts three candidates in one two-operand
        reduction (two counts packed in 16-bit halves, so at most 65535 lanes).  ``c_lo`` is the number of
        elements (at least K).  Stops as soon as exactly K keys reach the decided prefix.

        Returns ``(t, c_lo, c_hi)`` with c_lo = #(key >= t) >= K and c_hi = #(key >= t + 2**(bit + 1)) < K for
        the last bit decided (with every bit down to the keys' lowest decided, that is #(key > t)).
        With REC > 0, ``rec_ptr[r] = (t, c_lo)`` after each round r (rounds past REC - 1 overwrite the last slot,
        slots past the last round repeat the final pair): a staircase of exact counts, t rising and c_lo
        falling, that ends with the final pair."""
        t = (K * 0).to(tl.uint32)
        K = K.to(tl.int32)
        c_hi = K * 0
        bit = K * 0 + 31
        r = K * 0
        if BITS == 1:
            while (bit >= STOP) & (c_lo != K):
                cand = t | (t * 0 + 1) << bit.to(tl.uint32)
                c = tl.sum((key >= cand).to(tl.int32), 0)
                accept = c >= K
                t = tl.where(accept, cand, t)
                c_lo = tl.where(accept, c, c_lo)
                c_hi = tl.where(accept, c_hi, c)
                bit -= 1
                if REC > 0:
                    _record(rec_ptr, r, t, c_lo, REC)
                    r += 1
        else:
            while (bit >= STOP) & (c_lo != K):
                sh = tl.maximum(bit - 1, STOP)
                one = (t * 0 + 1) << sh.to(tl.uint32)
                p = (key >= (t | one)).to(tl.int32) + ((key >= (t | (one * 3))).to(tl.int32) << 16)
                q = (key >= (t | (one * 2))).to(tl.int32)
                sp, sq = tl.reduce((p, q), 0, _add2)
                t, c_lo, c_hi = _bisect_step(t, sh, sh < bit, sp & 0xFFFF, sq, sp >> 16, K, c_lo, c_hi)
                bit = sh - 1
                if REC > 0:
                    _record(rec_ptr, r, t, c_lo, REC)
                    r += 1
        if REC > 0:
            while r < REC:
                _record(rec_ptr, r, t, c_lo, REC)
                r += 1
        return t, c_lo, c_hi

    @triton.jit
    def _record(rec_ptr, r, t, c, REC: tl.constexpr):
        """Round r's pair at slot min(r, REC - 1): the last slot ends with the final (finest) pair."""
        slot = tl.minimum(r, REC - 1)
        tl.store(rec_ptr + slot * 2, t.to(tl.int32, bitcast=True))
        tl.store(rec_ptr + slot * 2 + 1, c)

    @triton.jit
    def _split_at(t, c_lo, c_hi, K):
        """``(t_ge, t_eq, ties)`` from a finished bisection: take every key >= t_ge, plus ``ties`` keys equal
        to t_eq (ties == 0 when the prefix split exactly)."""
        exact = c_lo == K
        t_ge = tl.where(exact, t, t + 1)  # keys are integers: key >= t + 1 <=> key > t
        ties = tl.where(exact, 0, K - c_hi)  # c_hi = #(key > t) once every bit is decided
        return t_ge, t, ties

    @triton.jit
    def _row_threshold(a, s, lo, hi, base, end, K, fill_key,
                       x_ptr, xs0, xs1, xs2, m_ptr, ms0, ms1, ms2, b_ptr, bs0, bs1, bs2,
                       MASK_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_DTYPE: tl.constexpr,
                       LOW_BIT: tl.constexpr, BLOCK: tl.constexpr, BITS: tl.constexpr):
        """The K-th largest key of positions [base, end) (at most BLOCK of them, at least K), held in registers:
        only the keys (one uint32 per lane) and scalars are live.  Returns ``_split_at``'s triple."""
        lane = tl.arange(0, BLOCK)
        cols = base + lane.to(tl.int64)
        exist = cols < end
        key = _keys_at(cols, a, s, lo, hi, fill_key, x_ptr, xs0, xs1, xs2, m_ptr, ms0, ms1, ms2,
                       b_ptr, bs0, bs1, bs2, MASK_MODE, HAS_BIAS, OUT_DTYPE, LOW_BIT)
        key = tl.where(exist, key, 0)  # 0: no element (every real key is >= 1)
        t, c_lo, c_hi = _bisect_keys(key, K, K.to(tl.int32) * 0 + BLOCK, LOW_BIT, BITS)
        return _split_at(t, c_lo, c_hi, K.to(tl.int32))

    @triton.jit
    def _place(key, cols, exist, t_ge, t_eq, ties, n_above, off_a, off_e, out, val_ptr, idx_ptr,
               LOW_BIT: tl.constexpr, WRITE_VALUES: tl.constexpr, OUT_DTYPE: tl.constexpr):
        """Write one tile's winners (keys >= t_ge at slots off_a.., keys equal to t_eq at n_above + off_e.., the
        first ``ties`` of those) by one packed scan; returns the advanced ``(off_a, off_e)``."""
        above = exist & (key >= t_ge)
        equal = exist & (key == t_eq)
        packed = above.to(tl.int32) + (equal.to(tl.int32) << 16)
        ranks = tl.cumsum(packed, 0) - packed
        e_rank = off_e + (ranks >> 16)
        take = above | (equal & (e_rank < ties))
        pos = tl.where(above, off_a + (ranks & 0xFFFF), n_above + e_rank)
        tl.store(idx_ptr + out + pos, cols, mask=take)
        if WRITE_VALUES:
            tl.store(val_ptr + out + pos, _key_to_value(key, LOW_BIT).to(OUT_DTYPE), mask=take)
        tot = tl.sum(packed, 0)
        return off_a + (tot & 0xFFFF), off_e + (tot >> 16)

    @triton.jit
    def _compact_tiles(a, s, lo, hi, base, end, K, out, t_ge, t_eq, ties, fill_key,
                       x_ptr, xs0, xs1, xs2, m_ptr, ms0, ms1, ms2, b_ptr, bs0, bs1, bs2, val_ptr, idx_ptr,
                       MASK_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_DTYPE: tl.constexpr,
                       LOW_BIT: tl.constexpr, WRITE_VALUES: tl.constexpr, TILE: tl.constexpr):
        """Stream positions [base, end) in TILE-lane tiles (keys recomputed from memory) and write the
        winners: keys >= t_ge at slots [0, K - ties) in position order, then the first ``ties`` keys
        equal to t_eq.  One packed scan per tile; stops once all K slots are written."""
        lane = tl.arange(0, TILE)
        n_above = K - ties
        off_a = ties * 0
        off_e = ties * 0
        start = base
        while (start < end) & ((off_a < n_above) | (off_e < ties)):
            cols = start + lane.to(tl.int64)
            exist = cols < end
            key = _keys_at(cols, a, s, lo, hi, fill_key, x_ptr, xs0, xs1, xs2, m_ptr, ms0, ms1, ms2,
                           b_ptr, bs0, bs1, bs2, MASK_MODE, HAS_BIAS, OUT_DTYPE, LOW_BIT)
            off_a, off_e = _place(key, cols, exist, t_ge, t_eq, ties, n_above, off_a, off_e, out, val_ptr, idx_ptr,
                                  LOW_BIT, WRITE_VALUES, OUT_DTYPE)
            start += TILE

    @triton.jit(do_not_specialize=["S", "N", "K"])
    def _v5_row_kernel(
        x_ptr, xs0, xs1, xs2,
        st_ptr, sts0, sts1, en_ptr, ens0, ens1,
        m_ptr, ms0, ms1, ms2,
        b_ptr, bs0, bs1, bs2,
        val_ptr, idx_ptr, thr_ptr,
        S, N, K, fill,
        HAS_STARTS: tl.constexpr, HAS_ENDS: tl.constexpr, MASK_MODE: tl.constexpr,
        HAS_BIAS: tl.constexpr, RANGE_ONLY: tl.constexpr, WRITE_VALUES: tl.constexpr, LOW_BIT: tl.constexpr,
        BLOCK: tl.constexpr, TILE: tl.constexpr, BITS: tl.constexpr, PHASE: tl.constexpr, OUT_DTYPE: tl.constexpr,
    ):
        """One program per row (N <= BLOCK), last row first (causal rows longest first).

        PHASE 0: threshold then compaction in one program (the keys' registers are dead before the
        compaction's tile loop starts).  PHASE 1: threshold only, written to ``thr_ptr`` [rows, 4]
        int32; PHASE 2: compaction only, reading it.  RANGE_ONLY (bounds only, fill -inf): lanes cover
        [lo, hi) in a register block of BLOCK, BLOCK/2 or BLOCK/4 lanes, and a row with at most K in
        range short-circuits; otherwise lanes cover [0, N) (masked positions hold ``fill``)."""
        row = (tl.num_programs(0) - 1 - tl.program_id(0)).to(tl.int64)
        a, s, lo, hi = _row_bounds(row, S, N, st_ptr, sts0, sts1, en_ptr, ens0, ens1, HAS_STARTS, HAS_ENDS)
        fill_key = _fill_key(fill, LOW_BIT)
        short = (hi - lo) < 0
        if RANGE_ONLY:
            short = (hi - lo) <= K
        if short:
            if PHASE != 1:
                _short_row(row, a, s, lo, hi, K, fill, x_ptr, xs0, xs1, xs2, val_ptr, idx_ptr,
                           WRITE_VALUES, OUT_DTYPE, TILE)
        else:
            if RANGE_ONLY:
                base = lo
                end = hi
            else:
                base = lo * 0
                end = N.to(tl.int64)
            if PHASE == 2:
                t_ge = tl.load(thr_ptr + row * 4).to(tl.uint32, bitcast=True)
                t_eq = tl.load(thr_ptr + row * 4 + 1).to(tl.uint32, bitcast=True)
                ties = tl.load(thr_ptr + row * 4 + 2)
            else:
                if RANGE_ONLY and BLOCK >= 64:
                    lanes = end - base
                    if lanes <= BLOCK // 4:
                        t_ge, t_eq, ties = _row_threshold(
                            a, s, lo, hi, base, end, K, fill_key, x_ptr, xs0, xs1, xs2, m_ptr, ms0, ms1, ms2,
                            b_ptr, bs0, bs1, bs2, MASK_MODE, HAS_BIAS, OUT_DTYPE, LOW_BIT, BLOCK // 4, BITS)
                    elif lanes <= BLOCK // 2:
                        t_ge, t_eq, ties = _row_threshold(
                            a, s, lo, hi, base, end, K, fill_key, x_ptr, xs0, xs1, xs2, m_ptr, ms0, ms1, ms2,
                            b_ptr, bs0, bs1, bs2, MASK_MODE, HAS_BIAS, OUT_DTYPE, LOW_BIT, BLOCK // 2, BITS)
                    else:
                        t_ge, t_eq, ties = _row_threshold(
                            a, s, lo, hi, base, end, K, fill_key, x_ptr, xs0, xs1, xs2, m_ptr, ms0, ms1, ms2,
                            b_ptr, bs0, bs1, bs2, MASK_MODE, HAS_BIAS, OUT_DTYPE, LOW_BIT, BLOCK, BITS)
                else:
                    t_ge, t_eq, ties = _row_threshold(
                        a, s, lo, hi, base, end, K, fill_key, x_ptr, xs0, xs1, xs2, m_ptr, ms0, ms1, ms2,
                        b_ptr, bs0, bs1, bs2, MASK_MODE, HAS_BIAS, OUT_DTYPE, LOW_BIT, BLOCK, BITS)
                if PHASE == 1:
                    tl.store(thr_ptr + row * 4, t_ge.to(tl.int32, bitcast=True))
                    tl.store(thr_ptr + row * 4 + 1, t_eq.to(tl.int32, bitcast=True))
                    tl.store(thr_ptr + row * 4 + 2, ties)
            if PHASE != 1:
                _compact_tiles(a, s, lo, hi, base, end, K, row * K, t_ge, t_eq, ties, fill_key,
                               x_ptr, xs0, xs1, xs2, m_ptr, ms0, ms1, ms2, b_ptr, bs0, bs1, bs2, val_ptr, idx_ptr,
                               MASK_MODE, HAS_BIAS, OUT_DTYPE, LOW_BIT, WRITE_VALUES, TILE)

    @triton.jit
    def _radix_chain(h_ptr, K, NUSE: tl.constexpr, DIGIT: tl.constexpr):
        """Replay the first NUSE radix passes of a row from its histograms ``h_ptr[p, 2**DIGIT]``.

        Pass p counted, among the keys whose bits above ``32 - DIGIT * p`` equal the prefix decided so
        far, each value of the next DIGIT bits.  Returns ``(prefix, k_rem, done)``: the decided bits,
        how many keys still to take among those sharing the prefix, and whether the keys >= prefix are
        exactly the K winners (then later passes are skipped)."""
        BINS: tl.constexpr = 1 << DIGIT
        bins = tl.arange(0, BINS)
        prefix = (K * 0).to(tl.uint32)
        k_rem = K.to(tl.int32)
        done = K.to(tl.int32) * 0
        for p in tl.static_range(NUSE):
            if done == 0:
                h = tl.load(h_ptr + p * BINS + bins)
                ge = tl.sum(h, 0) - tl.cumsum(h, 0) + h  # keys with digit >= b
                b = tl.max(tl.where(ge >= k_rem, bins, 0), 0)
                ge_b = tl.sum(tl.where(bins == b, ge, 0), 0)
                h_b = tl.sum(tl.where(bins == b, h, 0), 0)
                prefix = prefix | (b.to(tl.uint32) << (32 - DIGIT * (p + 1)))
                done = (ge_b == k_rem).to(tl.int32)
                k_rem = k_rem - (ge_b - h_b)
        return prefix, k_rem, done

    @triton.jit(do_not_specialize=["S", "N", "K", "CHUNK"])
    def _v5_hist_kernel(
        x_ptr, xs0, xs1, xs2,
        st_ptr, sts0, sts1, en_ptr, ens0, ens1,
        m_ptr, ms0, ms1, ms2,
        b_ptr, bs0, bs1, bs2,
        h_ptr,
        S, N, K, CHUNK, fill,
        HAS_STARTS: tl.constexpr, HAS_ENDS: tl.constexpr, MASK_MODE: tl.constexpr,
        HAS_BIAS: tl.constexpr, RANGE_ONLY: tl.constexpr, LOW_BIT: tl.constexpr,
        TILE: tl.constexpr, PASS: tl.constexpr, NPASS: tl.constexpr, DIGIT: tl.constexpr, OUT_DTYPE: tl.constexpr,
    ):
        """Radix pass PASS over one chunk of a row (grid: rows x chunks): replay passes < PASS from the
        row's histograms, then add this chunk's histogram of the next DIGIT key bits (of the keys that
        share the prefix) to ``h_ptr[row, PASS]`` with atomics."""
        BINS: tl.constexpr = 1 << DIGIT
        SH: tl.constexpr = 32 - DIGIT * (PASS + 1)
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1).to(tl.int64)
        a, s, lo, hi = _row_bounds(row, S, N, st_ptr, sts0, sts1, en_ptr, ens0, ens1, HAS_STARTS, HAS_ENDS)
        fill_key = _fill_key(fill, LOW_BIT)
        base, end, skip = _row_span(lo, hi, N, K, RANGE_ONLY)
        c0 = base + chunk * CHUNK
        c1 = tl.minimum(c0 + CHUNK, end)
        h_row = h_ptr + row * (NPASS << DIGIT)
        if (c0 < end) & (skip == 0):
            prefix, k_rem, done = _radix_chain(h_row, K, PASS, DIGIT)
            if done == 0:
                bins = tl.arange(0, BINS)
                lane = tl.arange(0, TILE)
                h = tl.zeros([BINS], dtype=tl.int32)
                miss = tl.sum(h, 0)
                for start in range(c0, c1, TILE):
                    cols = start + lane.to(tl.int64)
                    exist = cols < c1
                    key = _keys_at(cols, a, s, lo, hi, fill_key, x_ptr, xs0, xs1, xs2, m_ptr, ms0, ms1, ms2,
                                   b_ptr, bs0, bs1, bs2, MASK_MODE, HAS_BIAS, OUT_DTYPE, LOW_BIT)
                    if PASS > 0:
                        match = exist & ((key >> (SH + DIGIT)) == (prefix >> (SH + DIGIT)))
                    else:
                        match = exist
                    d = tl.where(match, (key >> SH) & (BINS - 1), 0).to(tl.int32)
                    h += tl.histogram(d, BINS)
                    miss += tl.sum((~match).to(tl.int32), 0)  # counted in bin 0 above
                h = h - tl.where(bins == 0, miss, 0)
                tl.atomic_add(h_row + PASS * BINS + bins, h, mask=h > 0, sem="relaxed")

    @triton.jit(do_not_specialize=["S", "N", "K", "CHUNK"])
    def _v5_split_compact_kernel(
        x_ptr, xs0, xs1, xs2,
        st_ptr, sts0, sts1, en_ptr, ens0, ens1,
        m_ptr, ms0, ms1, ms2,
        b_ptr, bs0, bs1, bs2,
        h_ptr, ctr_ptr, val_ptr, idx_ptr,
        S, N, K, CHUNK, fill,
        HAS_STARTS: tl.constexpr, HAS_ENDS: tl.constexpr, MASK_MODE: tl.constexpr,
        HAS_BIAS: tl.constexpr, RANGE_ONLY: tl.constexpr, WRITE_VALUES: tl.constexpr, LOW_BIT: tl.constexpr,
        TILE: tl.constexpr, NPASS: tl.constexpr, DIGIT: tl.constexpr, OUT_DTYPE: tl.constexpr,
    ):
        """Compaction of one chunk of a row after the radix passes (grid: rows x chunks).

        Keys above the threshold go to slots [0, K - ties), the taken ties after them; each tile
        reserves its slots with one 64-bit atomic on the row's counter ``ctr_ptr[row]`` (above count in
        the low word, equal count in the high word), so slot order follows tile arrival order (the
        output is unsorted; ties may pick any of the equal positions)."""
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1).to(tl.int64)
        a, s, lo, hi = _row_bounds(row, S, N, st_ptr, sts0, sts1, en_ptr, ens0, ens1, HAS_STARTS, HAS_ENDS)
        fill_key = _fill_key(fill, LOW_BIT)
        base, end, short = _row_span(lo, hi, N, K, RANGE_ONLY)
        if short:
            if chunk == 0:
                _short_row(row, a, s, lo, hi, K, fill, x_ptr, xs0, xs1, xs2, val_ptr, idx_ptr,
                           WRITE_VALUES, OUT_DTYPE, TILE)
        else:
            c0 = base + chunk * CHUNK
            c1 = tl.minimum(c0 + CHUNK, end)
            if c0 < end:
                prefix, k_rem, done = _radix_chain(h_ptr + row * (NPASS << DIGIT), K, NPASS, DIGIT)
                # Not done after every pass: the prefix is the K-th key itself (bits below LOW_BIT are 0).
                t_ge = tl.where(done != 0, prefix, prefix + 1)
                t_eq = prefix
                ties = tl.where(done != 0, 0, k_rem)
                n_above = K - ties
                out = row * K
                lane = tl.arange(0, TILE)
                for start in range(c0, c1, TILE):
                    cols = start + lane.to(tl.int64)
                    exist = cols < c1
                    key = _keys_at(cols, a, s, lo, hi, fill_key, x_ptr, xs0, xs1, xs2, m_ptr, ms0, ms1, ms2,
                                   b_ptr, bs0, bs1, bs2, MASK_MODE, HAS_BIAS, OUT_DTYPE, LOW_BIT)
                    above = exist & (key >= t_ge)
                    equal = exist & (key == t_eq)
                    packed = above.to(tl.int32) + (equal.to(tl.int32) << 16)
                    tot = tl.sum(packed, 0)
                    if tot != 0:
                        inc = (tot & 0xFFFF).to(tl.int64) + ((tot >> 16).to(tl.int64) << 32)
                        old = tl.atomic_add(ctr_ptr + row, inc, sem="relaxed")
                        ranks = tl.cumsum(packed, 0) - packed
                        e_rank = (old >> 32).to(tl.int32) + (ranks >> 16)
                        take = above | (equal & (e_rank < ties))
                        pos = tl.where(above, (old & 0xFFFFFFFF).to(tl.int32) + (ranks & 0xFFFF), n_above + e_rank)
                        tl.store(idx_ptr + out + pos, cols, mask=take)
                        if WRITE_VALUES:
                            tl.store(val_ptr + out + pos, _key_to_value(key, LOW_BIT).to(OUT_DTYPE), mask=take)



    # ---- v7: bound, filter, resolve (rows longer than one program holds: decode) --------------------------
    # K1 (rows x chunks): a prefix bisection of the chunk's keys toward its KC-th largest, stopped at STOP_BIT,
    # recording each round's (threshold, exact count at or above it).  K2 (rows x chunks): T = the highest
    # recorded threshold at which the row's chunks hold K keys together (``_row_bound``) -- never above the
    # row's K-th key, so the keys >= T hold the top K -- and the chunk's keys >= T appended to the row's
    # candidate list (one atomic per tile).  K3 (rows): the exact top K of the candidates in registers, or,
    # when they overflow the list's CAP, of the row itself by a streaming bisection.  See bench/NOTES.md
    # (session 22).

    @triton.jit(do_not_specialize=["S", "N", "K", "CHUNK", "KC_NUM"])
    def _v7_bound_kernel(
        x_ptr, xs0, xs1, xs2,
        st_ptr, sts0, sts1, en_ptr, ens0, ens1,
        m_ptr, ms0, ms1, ms2,
        b_ptr, bs0, bs1, bs2,
        bnd_ptr, ctr_ptr,
        S, N, K, CHUNK, KC_NUM, fill,
        HAS_STARTS: tl.constexpr, HAS_ENDS: tl.constexpr, MASK_MODE: tl.constexpr,
        HAS_BIAS: tl.constexpr, RANGE_ONLY: tl.constexpr, LOW_BIT: tl.constexpr, OUT_DTYPE: tl.constexpr,
        BLOCK: tl.constexpr, MAXC: tl.constexpr, REC: tl.constexpr, STOP_BIT: tl.constexpr, BITS: tl.constexpr,
    ):
        """K1: ``bnd_ptr[row, chunk, r] = (t, g)``, REC pairs of one chunk of CHUNK (<= BLOCK) positions: the
        staircase of its bisection for the KC-th largest key, KC = cdiv(KC_NUM, chunks of the row), every pair a
        threshold and the exact number of the chunk's keys at or above it (``_bisect_keys``); (0, 0) past the
        row's end.  Zeroes the row's candidate counter (chunk 0)."""
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1).to(tl.int64)
        a, s, lo, hi = _row_bounds(row, S, N, st_ptr, sts0, sts1, en_ptr, ens0, ens1, HAS_STARTS, HAS_ENDS)
        base, end, short = _row_span(lo, hi, N, K, RANGE_ONLY)
        c0 = base + chunk * CHUNK
        c1 = tl.minimum(c0 + CHUNK, end)
        n_c = tl.maximum(c1 - c0, 0).to(tl.int32)
        rec = bnd_ptr + (row * MAXC + chunk) * (2 * REC)
        chunks = tl.maximum((end - base + CHUNK - 1) // CHUNK, 1)  # of this row
        kc = ((KC_NUM + chunks - 1) // chunks).to(tl.int32)
        if (n_c > kc) & (short == 0):
            cols = c0 + tl.arange(0, BLOCK).to(tl.int64)
            key = _keys_at(cols, a, s, lo, hi, _fill_key(fill, LOW_BIT), x_ptr, xs0, xs1, xs2, m_ptr, ms0, ms1,
                           ms2, b_ptr, bs0, bs1, bs2, MASK_MODE, HAS_BIAS, OUT_DTYPE, LOW_BIT)
            key = tl.where(cols < c1, key, 0)
            # Pairs (0, n_c) before the first accepted round are true (every key is >= 0), and useless.
            _bisect_keys(key, kc, n_c, STOP_BIT, BITS, rec, REC)
        else:  # the whole chunk: (1, n_c) (every real key is >= 1); no key (past the row's end, a short row): (0, 0)
            g = tl.where(short == 0, n_c, 0)
            for r in tl.static_range(REC):
                _record(rec, r, (g > 0).to(tl.uint32), g, REC)
        if chunk == 0:
            tl.store(ctr_ptr + row, 0)

    @triton.jit
    def _row_bound(bnd_ptr, row, K, NCH, MAXC: tl.constexpr, REC: tl.constexpr):
        """The row's lower bound T of its K-th key from K1's staircases: the largest recorded threshold τ at
        which the chunks guarantee K keys, Σ_chunks (count of the chunk's lowest pair with t >= τ) >= K; 1 (every
        real key) when none does.  A chunk's pairs rise in t and fall in count, so that count is the sum of
        the count drops d_r = g_r - g_(r+1) over its pairs with t >= τ: one [pairs, pairs] compare."""
        p = tl.arange(0, MAXC * REC)
        ok = (p // REC) < NCH
        base = bnd_ptr + row * (MAXC * REC * 2)
        t = tl.load(base + p * 2, mask=ok, other=0).to(tl.uint32, bitcast=True)
        g = tl.load(base + p * 2 + 1, mask=ok, other=0)
        g_next = tl.load(base + p * 2 + 3, mask=ok & ((p % REC) < REC - 1), other=0)
        d = g - g_next
        held = tl.sum(tl.where(t[None, :] >= t[:, None], d[None, :], 0), 1)
        return tl.maximum(tl.max(tl.where(held >= K, t, 0), 0), 1)

    @triton.jit(do_not_specialize=["K", "NCH"])
    def _v7_row_bound_kernel(bnd_ptr, tb_ptr, K, NCH, MAXC: tl.constexpr, REC: tl.constexpr):
        """``tb_ptr[row]`` = the row's ``_row_bound``, once per row (the ``row_bound`` knob: K2 then loads it
        instead of combining the pairs in each of its programs)."""
        row = tl.program_id(0).to(tl.int64)
        tl.store(tb_ptr + row, _row_bound(bnd_ptr, row, K, NCH, MAXC, REC).to(tl.int32, bitcast=True))

    @triton.jit(do_not_specialize=["S", "N", "K", "CHUNK", "NCH", "CAP"])
    def _v7_filter_kernel(
        x_ptr, xs0, xs1, xs2,
        st_ptr, sts0, sts1, en_ptr, ens0, ens1,
        m_ptr, ms0, ms1, ms2,
        b_ptr, bs0, bs1, bs2,
        bnd_ptr, tb_ptr, ctr_ptr, ck_ptr, cp_ptr,
        S, N, K, CHUNK, NCH, CAP, fill,
        HAS_STARTS: tl.constexpr, HAS_ENDS: tl.constexpr, MASK_MODE: tl.constexpr,
        HAS_BIAS: tl.constexpr, RANGE_ONLY: tl.constexpr, LOW_BIT: tl.constexpr, OUT_DTYPE: tl.constexpr,
        TILE: tl.constexpr, MAXC: tl.constexpr, REC: tl.constexpr, ROW_BOUND: tl.constexpr,
    ):
        """K2: append the chunk's keys >= the row's bound (``_row_bound``, or ``tb_ptr[row]`` with ROW_BOUND) to
        the row's candidate list (``ck_ptr`` keys, ``cp_ptr`` positions, [rows, CAP]); ``ctr_ptr[row]`` counts
        them all, also past CAP (those are not written)."""
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1).to(tl.int64)
        a, s, lo, hi = _row_bounds(row, S, N, st_ptr, sts0, sts1, en_ptr, ens0, ens1, HAS_STARTS, HAS_ENDS)
        base, end, short = _row_span(lo, hi, N, K, RANGE_ONLY)
        c0 = base + chunk * CHUNK
        c1 = tl.minimum(c0 + CHUNK, end)
        if (c0 < end) & (short == 0):
            if ROW_BOUND:
                bound = tl.load(tb_ptr + row).to(tl.uint32, bitcast=True)
            else:
                bound = _row_bound(bnd_ptr, row, K, NCH, MAXC, REC)
            fill_key = _fill_key(fill, LOW_BIT)
            lane = tl.arange(0, TILE)
            for start in range(c0, c1, TILE):
                cols = start + lane.to(tl.int64)
                key = _keys_at(cols, a, s, lo, hi, fill_key, x_ptr, xs0, xs1, xs2, m_ptr, ms0, ms1, ms2,
                               b_ptr, bs0, bs1, bs2, MASK_MODE, HAS_BIAS, OUT_DTYPE, LOW_BIT)
                sel = ((cols < c1) & (key >= bound)).to(tl.int32)
                cnt = tl.sum(sel, 0)
                if cnt > 0:
                    slot = tl.atomic_add(ctr_ptr + row, cnt, sem="relaxed") + tl.cumsum(sel, 0) - sel
                    keep = (sel != 0) & (slot < CAP)
                    tl.store(ck_ptr + row * CAP + slot, key.to(tl.int32, bitcast=True), mask=keep)
                    tl.store(cp_ptr + row * CAP + slot, cols.to(tl.int32), mask=keep)

    @triton.jit
    def _list_threshold(ck_ptr, n, K, LOW_BIT: tl.constexpr, BLOCK: tl.constexpr, BITS: tl.constexpr):
        """``_split_at``'s triple for the K-th largest of the n (<= BLOCK, >= K) keys of a candidate list."""
        lane = tl.arange(0, BLOCK)
        key = tl.load(ck_ptr + lane, mask=lane < n, other=0).to(tl.uint32, bitcast=True)
        t, c_lo, c_hi = _bisect_keys(key, K, n, LOW_BIT, BITS)
        return _split_at(t, c_lo, c_hi, K.to(tl.int32))

    @triton.jit
    def _stream_threshold(a, s, lo, hi, base, end, K, fill_key,
                          x_ptr, xs0, xs1, xs2, m_ptr, ms0, ms1, ms2, b_ptr, bs0, bs1, bs2,
                          MASK_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_DTYPE: tl.constexpr,
                          LOW_BIT: tl.constexpr, TILE: tl.constexpr):
        """``_row_threshold`` for a row of any length: each 2-bit round streams the row in TILE-lane tiles (the
        slow path of rows whose candidates overflow)."""
        lane = tl.arange(0, TILE)
        K = K.to(tl.int32)
        t = (K * 0).to(tl.uint32)
        c_lo = (end - base).to(tl.int32)
        c_hi = K * 0
        bit = K * 0 + 31
        while (bit >= LOW_BIT) & (c_lo != K):
            sh = tl.maximum(bit - 1, LOW_BIT)
            one = (t * 0 + 1) << sh.to(tl.uint32)
            n1 = K * 0
            n2 = K * 0
            n3 = K * 0
            for start in range(base, end, TILE):
                cols = start + lane.to(tl.int64)
                key = _keys_at(cols, a, s, lo, hi, fill_key, x_ptr, xs0, xs1, xs2, m_ptr, ms0, ms1, ms2,
                               b_ptr, bs0, bs1, bs2, MASK_MODE, HAS_BIAS, OUT_DTYPE, LOW_BIT)
                key = tl.where(cols < end, key, 0)
                n1 += tl.sum((key >= (t | one)).to(tl.int32), 0)
                n2 += tl.sum((key >= (t | (one * 2))).to(tl.int32), 0)
                n3 += tl.sum((key >= (t | (one * 3))).to(tl.int32), 0)
            t, c_lo, c_hi = _bisect_step(t, sh, sh < bit, n1, n2, n3, K, c_lo, c_hi)
            bit = sh - 1
        return _split_at(t, c_lo, c_hi, K)

    @triton.jit(do_not_specialize=["S", "N", "K", "CAP"])
    def _v7_resolve_kernel(
        x_ptr, xs0, xs1, xs2,
        st_ptr, sts0, sts1, en_ptr, ens0, ens1,
        m_ptr, ms0, ms1, ms2,
        b_ptr, bs0, bs1, bs2,
        ctr_ptr, ck_ptr, cp_ptr, val_ptr, idx_ptr,
        S, N, K, CAP, fill,
        HAS_STARTS: tl.constexpr, HAS_ENDS: tl.constexpr, MASK_MODE: tl.constexpr,
        HAS_BIAS: tl.constexpr, RANGE_ONLY: tl.constexpr, WRITE_VALUES: tl.constexpr, LOW_BIT: tl.constexpr,
        OUT_DTYPE: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr, BITS: tl.constexpr,
    ):
        """K3 (one program per row): the row's top K from its n candidates, in registers of BLOCK, BLOCK/2 or
        BLOCK/4 lanes (n <= CAP <= BLOCK), written in candidate order; past CAP, from the row itself (streamed,
        written in position order); a short row directly."""
        row = tl.program_id(0).to(tl.int64)
        a, s, lo, hi = _row_bounds(row, S, N, st_ptr, sts0, sts1, en_ptr, ens0, ens1, HAS_STARTS, HAS_ENDS)
        base, end, short = _row_span(lo, hi, N, K, RANGE_ONLY)
        fill_key = _fill_key(fill, LOW_BIT)
        out = row * K
        if short:
            _short_row(row, a, s, lo, hi, K, fill, x_ptr, xs0, xs1, xs2, val_ptr, idx_ptr, WRITE_VALUES, OUT_DTYPE,
                       TILE)
        else:
            n = tl.load(ctr_ptr + row)
            if n <= CAP:
                ck = ck_ptr + row * CAP
                cp = cp_ptr + row * CAP
                if BLOCK >= 64:
                    if n <= BLOCK // 4:
                        t_ge, t_eq, ties = _list_threshold(ck, n, K, LOW_BIT, BLOCK // 4, BITS)
                    elif n <= BLOCK // 2:
                        t_ge, t_eq, ties = _list_threshold(ck, n, K, LOW_BIT, BLOCK // 2, BITS)
                    else:
                        t_ge, t_eq, ties = _list_threshold(ck, n, K, LOW_BIT, BLOCK, BITS)
                else:
                    t_ge, t_eq, ties = _list_threshold(ck, n, K, LOW_BIT, BLOCK, BITS)
                lane = tl.arange(0, TILE)
                n_above = K - ties
                off_a = ties * 0
                off_e = ties * 0
                start = n * 0
                while (start < n) & ((off_a < n_above) | (off_e < ties)):
                    i = start + lane
                    exist = i < n
                    key = tl.load(ck + i, mask=exist, other=0).to(tl.uint32, bitcast=True)
                    cols = tl.load(cp + i, mask=exist, other=0)
                    off_a, off_e = _place(key, cols, exist, t_ge, t_eq, ties, n_above, off_a, off_e, out, val_ptr,
                                          idx_ptr, LOW_BIT, WRITE_VALUES, OUT_DTYPE)
                    start += TILE
            else:
                t_ge, t_eq, ties = _stream_threshold(a, s, lo, hi, base, end, K, fill_key, x_ptr, xs0, xs1, xs2,
                                                     m_ptr, ms0, ms1, ms2, b_ptr, bs0, bs1, bs2, MASK_MODE, HAS_BIAS,
                                                     OUT_DTYPE, LOW_BIT, TILE)
                _compact_tiles(a, s, lo, hi, base, end, K, out, t_ge, t_eq, ties, fill_key,
                               x_ptr, xs0, xs1, xs2, m_ptr, ms0, ms1, ms2, b_ptr, bs0, bs1, bs2, val_ptr, idx_ptr,
                               MASK_MODE, HAS_BIAS, OUT_DTYPE, LOW_BIT, WRITE_VALUES, TILE)


_TL_DTYPES = {}
if triton is not None:
    _TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

SMALL = 256  # phase-2 band size (lanes); see _select_stage
IMPL = None  # None: the design measured faster for the shape (_auto_impl); "v4" / "v5" force one
V5_TILE = 1024  # lanes per compaction / histogram tile
V5_BITS = 2  # bisection bits per block reduction in the v5 row program (1 or 2)
V5_PHASES = "fused"  # "fused": threshold + compaction in one row kernel; "two": two kernels
V5_CHUNK = 4096  # positions per program of a split (long) row
V5_DIGIT = 8  # radix bits per histogram pass of a split row (256 bins)
V7_CHUNK = 4096  # positions per bound / filter program (at least; see _masked_topk_v7)
V7_MAX_CHUNKS = 64  # chunks per row at most (K2 combines the row's bound pairs in a [pairs, pairs] block)
V7_OVERSAMPLE = 1.5  # each chunk's bound aims at cdiv(k * this, chunks of the row) keys (1.5: 66.2 us, 2: 69.6)
V7_STOP_BIT = 16  # K1's bisection decides key bits 31..this (0 or 8: the filter's pair combine 54 us, not 33)
V7_RESOLVE_WARPS = 8
V7_MAX_PAIRS = 256  # staircase pairs per row that K2 combines (a [pairs, pairs] block per program)
V7_AUTO_MAX_N = 16 * V7_CHUNK  # _auto_impl's v7 rows: up to 16 chunks (128 pairs; see _auto_impl)
LAST_LAUNCHES: list = []  # what the last direct call launched (compiled kernels: n_regs, n_spills; for tuning)


def _default_warps(grid, block):
    """4 warps when there are programs enough to fill the GPU (measured best on H100 for 8192 x 8192
    rows), 8 when programs are few (decode rows).  Not 16: Triton 3.6's LLVM hit an SLPVectorizer
    assertion compiling the value-writing merge stage with 16 warps."""
    programs = grid[0] * grid[1]
    return 4 if programs >= 1024 else 8


SPLIT_MIN_ELEMENTS = 1 << 24  # rows * N from which long decode rows take v5's split path over v4 (see _auto_impl)
SPLIT_MAX_ROWS = 1024  # ... for decode batches only: many long rows (prefill past 16384 keys) were not measured


def _auto_impl(n: int, k: int, block_max: int, rows: int = 1, dtype: torch.dtype = torch.float32) -> str:
    """The design measured faster for the shape, on an H100 with Triton 3.6 (bench/NOTES.md, v5, session-20 and
    session-22 sections; GPU time of the kernels, k = 2048, unsorted):

    * rows that fit one program: v5's row program (causal 8192 x 8192: 296 us, v4 470-484 us);
    * rows of up to 16 chunks of ``V7_CHUNK`` (N <= 65536): v7 (64 x 65536 fp32: 69.6 us, v4 86.6, v5's split rows
      108.9; bf16 66.8, v4 86.5, v5 70.8; rows whose scores rise with the position 67.3, v4 89.9; 2048 prefill rows
      x 32768: 809.4, v4 2583.7, v5 1439.2);
    * longer rows: at 256 x 131072 fp32 (32 chunks) v7's filter spends most of its time combining the row's 256
      bound pairs in every program (701.7 us against v5's split rows 590.3, v4 985.2), so there as before: v5's
      split rows for bf16 and larger batches (``SPLIT_MIN_ELEMENTS``, rows * N, sits between the fp32 shapes
      measured in session 20), v4 otherwise;
    * v4 falls back to torch past ``2 k > block_max`` for long rows, v5's split path does not."""
    if n <= block_max or 2 * k > block_max:
        return "v5"
    if n <= V7_AUTO_MAX_N:
        return "v7"
    if rows <= SPLIT_MAX_ROWS and (dtype == torch.bfloat16 or rows * n >= SPLIT_MIN_ELEMENTS):
        return "v5"
    return "v4"


def _constexprs(row_starts, row_ends, mask, mask_keeps, bias, fill, out_dtype) -> dict:
    """The constexprs every design's kernels take: which row pieces exist, and the keys' lowest bit that can be
    nonzero (bf16 values use the top 16 bits of the fp32 key, fp16 the top 19)."""
    return dict(
        HAS_STARTS=row_starts is not None, HAS_ENDS=row_ends is not None,
        MASK_MODE=0 if mask is None else (1 if mask_keeps else 2), HAS_BIAS=bias is not None,
        RANGE_ONLY=(mask is None and bias is None and fill == float("-inf")),
        LOW_BIT={torch.bfloat16: 16, torch.float16: 13, torch.float32: 0}[out_dtype], OUT_DTYPE=_TL_DTYPES[out_dtype],
    )


def masked_topk_triton(logits, k, row_starts=None, row_ends=None, mask=None, mask_keeps=True, bias=None,
                       fill=float("-inf"), sorted=True, index_dtype=torch.int64, need_values=True,
                       block_max=BLOCK_MAX, num_warps=None, chunk=None, small=None, merge=None, impl=None,
                       tile=None, bits=None, phases=None, split=None, maxnreg=None, v7=None):
    """Run the Triton kernels (the op's CUDA path; tests and tuning call it directly).

    ``impl`` picks the design (default ``IMPL``, else ``_auto_impl``): ``"v5"`` (threshold then streaming
    compaction; rows longer than ``block_max`` split over programs with global radix histograms), ``"v7"``
    (bound, filter and resolve launches over chunks of a long row) or ``"v4"`` (row in registers, chunk + merge
    stages).  Knobs of all: ``block_max`` (most positions one row program holds in registers), ``chunk``
    (positions per program of a split row), ``num_warps``.

    v7: ``tile``, ``bits`` as v5's, and ``v7``, a dict of ``_masked_topk_v7``'s own knobs (``oversample``,
    ``stop_bit``, ``cap``, ``staircase``, ``row_bound``).

    v4: a longer row is cut into chunks of ``chunk`` (default ``block_max``) positions, each chunk keeps
    its top-k candidates and merge stages (``merge`` candidates per program) select among them.
    ``small`` is the phase-2 band size.

    v5: ``tile`` (lanes per compaction / histogram tile), ``bits`` (1 or 2 bisection bits per block
    reduction), ``phases`` (``"fused"``: one kernel; ``"two"``: a threshold kernel and a compaction
    kernel), ``split`` (None: rows longer than ``block_max``; True: every row, for tests and tuning),
    ``maxnreg`` (register cap per thread passed to Triton, None: ptxas decides).

    Tests shrink ``block_max``, ``small``, ``chunk`` and ``tile`` to run every path at small sizes under
    ``TRITON_INTERPRET=1``.
    """
    if triton is None:
        raise RuntimeError("masked_topk: triton is not installed")
    batch = by_metadata(_checked_batch, logits, k, row_starts, row_ends, mask, bias, index_dtype)
    impl = impl or IMPL or _auto_impl(logits.shape[-1], k, block_max, logits.numel() // max(logits.shape[-1], 1),
                                      _result_dtype(logits, bias))
    if impl == "v5":
        return _masked_topk_v5(logits, k, row_starts, row_ends, mask, mask_keeps, bias, fill, sorted, index_dtype,
                               need_values, block_max, num_warps, chunk, tile, bits, phases, split, maxnreg, batch)
    if impl == "v7":
        return _masked_topk_v7(logits, k, row_starts, row_ends, mask, mask_keeps, bias, fill, sorted, index_dtype,
                               need_values, block_max, num_warps, chunk, tile, bits, maxnreg, batch, **(v7 or {}))
    if impl != "v4":
        raise ValueError(f"masked_topk: `impl` must be 'v5', 'v7' or 'v4', got {impl!r}")
    n = logits.shape[-1]
    if n >= 2**31 - 1:
        raise ValueError(f"masked_topk: the last dim of `logits` ({n}) must be < 2**31 - 1")
    out_dtype = _result_dtype(logits, bias)
    rows = math.prod(batch)
    values = logits.new_empty(*batch, k if need_values else 0, dtype=out_dtype)
    indices = logits.new_empty(*batch, k, dtype=index_dtype)
    if rows == 0 or k == 0:
        return values, indices
    chunk = min(chunk or block_max, block_max)
    if k > block_max or (n > block_max and (2 * k > block_max or k > chunk)):
        # Beyond the register budget of one program (k is then a large part of the row anyway).
        if mask is None and bias is None and fill == float("-inf") and not (need_values or sorted) and (
                row_starts is not None or row_ends is not None):
            # As the kernel's short-circuit: a row of at most k in-range positions selects them all
            # whatever its scores, which may be undefined there (index_score(outside_undefined=True)).
            lo = row_starts.long().clamp(0, n) if row_starts is not None else None
            hi = row_ends.long().clamp(0, n) if row_ends is not None else None
            if lo is None:
                length = hi
            elif hi is None:
                length = n - lo
            else:
                length = (hi - lo).clamp(min=0)
            logits = torch.where((length <= k).unsqueeze(-1), torch.zeros((), dtype=logits.dtype,
                                                                        device=logits.device), logits)
        v, i = masked_topk_reference(logits, k, row_starts, row_ends, mask, mask_keeps, bias, fill, sorted,
                                     index_dtype, True)
        return (v if need_values else values), i
    small = small or SMALL
    write_values = need_values or sorted  # sorted: the values order the winners (torch.sort below)
    args, x3 = _row_args(logits, row_starts, row_ends, mask, bias, batch, n)
    # The value buffer exists only when the kernel writes values (x3 stands in as an unused pointer).
    vbuf = values if need_values else logits.new_empty(*batch, k, dtype=out_dtype) if sorted else x3
    fill = _round_to(float(fill), out_dtype)
    common = dict(_constexprs(row_starts, row_ends, mask, mask_keeps, bias, fill, out_dtype),
                  WRITE_VALUES=write_values, SMALL=small)
    n_chunks = cdiv(n, chunk) if n > block_max else 1
    scratch = torch.empty(2, rows * max(n_chunks, cdiv(n_chunks * k, block_max)) * small,
                          dtype=torch.int32, device=logits.device).unbind(0)  # (views made once, not per launch)

    def launch_stage(grid, cand_in, cand_out, width, per_program, final, block):
        ck, ci = cand_in if cand_in is not None else (x3, x3)
        ok_, oi_ = cand_out if cand_out is not None else (x3, x3)
        LAST_LAUNCHES.append(_masked_topk_kernel[grid](
            *args,
            ck, ci, ok_, oi_, vbuf, indices, *scratch,
            batch[-1] if len(batch) else 1, n, k, width, per_program, fill,
            FROM_CANDIDATES=cand_in is not None, FINAL=final, BLOCK=block,
            num_warps=num_warps or _default_warps(grid, block), **common))

    LAST_LAUNCHES.clear()

    def candidates(width):
        return (torch.empty(rows, width, dtype=torch.int32, device=logits.device),
                torch.empty(rows, width, dtype=torch.int32, device=logits.device))

    if n <= block_max:
        launch_stage((rows, 1), None, None, 0, n, True, max(16, next_pow2(n)))
    else:
        cand = candidates(n_chunks * k)
        launch_stage((rows, n_chunks), None, cand, 0, chunk, False, next_pow2(chunk))
        width = n_chunks * k
        while width > block_max:  # merge groups of candidates until one program can take a row
            per_program = (min(merge or block_max, block_max) // k) * k
            groups = cdiv(width, per_program)
            nxt = candidates(groups * k)
            launch_stage((rows, groups), cand, nxt, width, per_program, False, block_max)
            cand, width = nxt, groups * k
        launch_stage((rows, 1), cand, None, width, width, True, max(16, next_pow2(width)))
    return _finish(values, indices, vbuf, sorted, need_values)



def _sort_descending(v: torch.Tensor):
    """``v.sort(dim=-1, descending=True)`` with every NaN first, as ``torch.topk`` ranks them.  CUDA's radix
    sort orders floats by their bits, so a NaN with the sign bit set (``-x`` of a NaN) would come last
    (pytorch#190781): the kernels write every NaN as the positive one (values decoded from the sortable
    key, whose NaN is ``float("nan")``, or ``_short_row``'s explicit ``where``), so a plain sort is right
    (a NaN's payload and sign are not observable through topk's ordering)."""
    return v.sort(dim=-1, descending=True)


class _Setup(typing.NamedTuple):
    values: torch.Tensor
    indices: torch.Tensor
    rows: int
    args: tuple
    vbuf: torch.Tensor
    fill: float
    low_bit: int
    common: dict
    s_dim: int


def _split_setup(logits, k, row_starts, row_ends, mask, mask_keeps, bias, fill, sorted, index_dtype, need_values,
                 maxnreg, batch) -> _Setup:
    """What every v5 / v7 launch shares: the outputs, the row arguments (``_row_args``), the value buffer the
    kernels write (``values``; a scratch one when only the sort needs values; else a stand-in), ``fill`` rounded
    to the result dtype, the keys' lowest bit and the common constexprs."""
    out_dtype = _result_dtype(logits, bias)
    values = logits.new_empty(*batch, k if need_values else 0, dtype=out_dtype)
    indices = logits.new_empty(*batch, k, dtype=index_dtype)
    LAST_LAUNCHES.clear()
    rows = math.prod(batch)
    if rows == 0 or k == 0:
        return _Setup(values, indices, rows, (), values, fill, 0, {}, 1)
    args, x3 = _row_args(logits, row_starts, row_ends, mask, bias, batch, logits.shape[-1])
    vbuf = values if need_values else logits.new_empty(*batch, k, dtype=out_dtype) if sorted else x3
    fill = _round_to(float(fill), out_dtype)
    common = _constexprs(row_starts, row_ends, mask, mask_keeps, bias, fill, out_dtype)
    low_bit = common["LOW_BIT"]
    if maxnreg is not None:  # only when asked: a launch option Triton checks per backend
        common["maxnreg"] = maxnreg
    return _Setup(values, indices, rows, args, vbuf, fill, low_bit, common, batch[-1] if len(batch) else 1)


def _finish(values, indices, vbuf, sorted, need_values):
    """``(values, indices)``; with ``sorted``, the winners ordered by their values in ``vbuf``.  Ordering them with
    tl.sort in-kernel measured slower than torch.sort on H100 (2048 winners: ~1.4 ms per 8192 rows) and was wrong
    on one bf16 case under Triton 3.6: torch.sort it is."""
    if sorted:
        vbuf, order = _sort_descending(vbuf)
        indices = indices.gather(-1, order)
        if need_values:
            values = vbuf
    return values, indices


def _masked_topk_v7(logits, k, row_starts, row_ends, mask, mask_keeps, bias, fill, sorted, index_dtype,
                    need_values, block_max, num_warps, chunk, tile, bits, maxnreg, batch, oversample=None,
                    stop_bit=None, cap=None, staircase=None, row_bound=False):
    """v7 launches (see the kernels' comment): bound and filter over chunks of ``chunk`` positions, then one
    resolve program per row over at most ``cap`` (default ``min(block_max, 4 k)``) candidates.  Three launches and
    a sort, no host sync, no data-dependent launch sizes (CUDA-graph safe); the candidate list's length is
    data-dependent only inside the kernels.  Knobs: ``oversample`` (V7_OVERSAMPLE), ``stop_bit`` (V7_STOP_BIT), ``cap``,
    ``staircase`` (False: one bound pair per chunk), ``row_bound`` (True: one more launch computes each row's bound
    once, where each filter program combines the row's pairs by default; not yet measured, bench/NOTES.md)."""
    n = logits.shape[-1]
    if n >= 2**31 - 1:
        raise ValueError(f"masked_topk: the last dim of `logits` ({n}) must be < 2**31 - 1")
    bits = bits or V5_BITS
    if bits not in (1, 2):
        raise ValueError(f"masked_topk: `bits` must be 1 or 2, got {bits!r}")
    chunk = chunk or max(V7_CHUNK, next_pow2(cdiv(n, V7_MAX_CHUNKS)))
    if chunk > 1 << 15 or cdiv(n, chunk) > V7_MAX_CHUNKS:
        raise ValueError(f"masked_topk: impl='v7' takes at most {V7_MAX_CHUNKS} chunks of at most {1 << 15} "
                         f"positions a row, got `chunk` {chunk} for N = {n}")
    setup = _split_setup(logits, k, row_starts, row_ends, mask, mask_keeps, bias, fill, sorted, index_dtype,
                         need_values, maxnreg, batch)
    if setup.rows == 0 or k == 0:
        return setup.values, setup.indices
    args, vbuf, fill, low_bit, common, s_dim, rows = (setup.args, setup.vbuf, setup.fill, setup.low_bit,
                                                      setup.common, setup.s_dim, setup.rows)
    n_chunks = cdiv(n, chunk)
    maxc = max(2, next_pow2(n_chunks))
    # The candidate list: 4 k slots a row (the scratch then grows with the rows as v4's candidates do, half the
    # logits' size at 32768 keys); a bound keeps ~1.5 k for scores that do not rise with the position, and
    # 8192 slots measured as fast as 16384 at 64 x 65536 (session 22).
    cap = min(cap or min(block_max, max(4 * k, 1024)), 1 << 15)
    til = min(next_pow2(tile or V5_TILE), next_pow2(chunk))
    kc_num = math.ceil(k * (oversample or V7_OVERSAMPLE))
    stop = max(low_bit, V7_STOP_BIT if stop_bit is None else stop_bit)
    # Staircase pairs per chunk: one per bisection round, as many as the [pairs, pairs] combine affords.
    rec = next_pow2(cdiv(32 - stop, bits)) if staircase is None or staircase else 1
    while maxc * rec > V7_MAX_PAIRS and rec > 1:
        rec //= 2
    # One allocation: the bounds [rows, maxc, rec, 2], the counters [rows], the candidate keys and positions.
    nb = rows * (maxc * rec * 2 + 1)
    scratch = torch.empty(nb + rows * (1 + 2 * cap), dtype=torch.int32, device=logits.device)
    bnd = scratch[: nb - rows]
    tb = scratch[nb - rows: nb]  # the rows' bounds (row_bound)
    ctr = scratch[nb: nb + rows]
    ck = scratch[nb + rows: nb + rows * (1 + cap)]
    cp = scratch[nb + rows * (1 + cap):]
    warps = num_warps or 4
    LAST_LAUNCHES.append(_v7_bound_kernel[(rows, n_chunks)](
        *args, bnd, ctr, s_dim, n, k, chunk, kc_num, fill, BLOCK=next_pow2(chunk), MAXC=maxc, REC=rec,
        STOP_BIT=stop, BITS=bits, num_warps=warps, **common))
    if row_bound:
        LAST_LAUNCHES.append(_v7_row_bound_kernel[(rows,)](bnd, tb, k, n_chunks, MAXC=maxc, REC=rec,
                                                           num_warps=warps))
    LAST_LAUNCHES.append(_v7_filter_kernel[(rows, n_chunks)](
        *args, bnd, tb, ctr, ck, cp, s_dim, n, k, chunk, n_chunks, cap, fill, TILE=til, MAXC=maxc, REC=rec,
        ROW_BOUND=bool(row_bound), num_warps=warps, **common))
    LAST_LAUNCHES.append(_v7_resolve_kernel[(rows,)](
        *args, ctr, ck, cp, vbuf, setup.indices, s_dim, n, k, cap, fill, WRITE_VALUES=need_values or sorted,
        BLOCK=max(16, next_pow2(cap)), TILE=min(next_pow2(tile or V5_TILE), max(16, next_pow2(cap))), BITS=bits,
        num_warps=V7_RESOLVE_WARPS, **common))
    return _finish(setup.values, setup.indices, vbuf, sorted, need_values)


def _masked_topk_v5(logits, k, row_starts, row_ends, mask, mask_keeps, bias, fill, sorted, index_dtype,
                    need_values, block_max, num_warps, chunk, tile, bits, phases, split, maxnreg, batch):
    """v5 launches (see masked_topk_triton): one row program when the row fits ``block_max``, else
    radix passes over chunks of ``chunk`` positions plus a chunked compaction.  No host sync and no
    data-dependent launch sizes (CUDA-graph safe)."""
    n = logits.shape[-1]
    if n >= 2**31 - 1:
        raise ValueError(f"masked_topk: the last dim of `logits` ({n}) must be < 2**31 - 1")
    phases = phases or V5_PHASES
    if phases not in ("fused", "two"):
        raise ValueError(f"masked_topk: `phases` must be 'fused' or 'two', got {phases!r}")
    bits = bits or V5_BITS
    if bits not in (1, 2):
        raise ValueError(f"masked_topk: `bits` must be 1 or 2, got {bits!r}")
    setup = _split_setup(logits, k, row_starts, row_ends, mask, mask_keeps, bias, fill, sorted, index_dtype,
                         need_values, maxnreg, batch)
    if setup.rows == 0 or k == 0:
        return setup.values, setup.indices
    args, vbuf, fill, low_bit, common, s_dim, rows = (setup.args, setup.vbuf, setup.fill, setup.low_bit,
                                                      setup.common, setup.s_dim, setup.rows)
    write_values = need_values or sorted  # sorted: the values order the winners (torch.sort below)
    x3, indices = args[0], setup.indices  # (x3: a stand-in pointer, never read)
    block_max = min(block_max, 1 << 15)  # 16-bit packed counts (bisection, compaction scans)
    if split is None:
        split = n > block_max
    if not split:
        block = max(16, next_pow2(n))
        til = min(next_pow2(tile or V5_TILE), block)
        warps = num_warps or _default_warps((rows, 1), block)
        thr = torch.empty(rows, 4, dtype=torch.int32, device=logits.device) if phases == "two" else x3
        for phase in ((0,) if phases == "fused" else (1, 2)):
            LAST_LAUNCHES.append(_v5_row_kernel[(rows,)](
                *args, vbuf, indices, thr, s_dim, n, k, fill, WRITE_VALUES=write_values, BLOCK=block, TILE=til,
                BITS=bits, PHASE=phase, num_warps=warps, **common))
    else:
        chunk = chunk or V5_CHUNK
        til = min(next_pow2(tile or V5_TILE), max(16, next_pow2(chunk)), 1 << 15)
        n_chunks = cdiv(n, chunk)
        npass = cdiv(32 - low_bit, V5_DIGIT)
        hw = npass << V5_DIGIT  # histogram words per row
        buf = torch.zeros(rows * (hw // 2 + 1), dtype=torch.int64, device=logits.device)  # one memset
        hist = buf[: rows * hw // 2].view(torch.int32)
        ctr = buf[rows * hw // 2:]
        warps = num_warps or 4
        for p in range(npass):
            LAST_LAUNCHES.append(_v5_hist_kernel[(rows, n_chunks)](
                *args, hist, s_dim, n, k, chunk, fill, TILE=til, PASS=p, NPASS=npass, DIGIT=V5_DIGIT,
                num_warps=warps, **common))
        LAST_LAUNCHES.append(_v5_split_compact_kernel[(rows, n_chunks)](
            *args, hist, ctr, vbuf, indices, s_dim, n, k, chunk, fill, WRITE_VALUES=write_values, TILE=til,
            NPASS=npass, DIGIT=V5_DIGIT, num_warps=warps, **common))
    return _finish(setup.values, setup.indices, vbuf, sorted, need_values)


@fused_op(OP_NAME)
def masked_topk(
    logits: torch.Tensor,
    k: int,
    row_starts: Optional[torch.Tensor],
    row_ends: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    mask_keeps: bool,
    bias: Optional[torch.Tensor],
    fill: float,
    sorted: bool,
    index_dtype: torch.dtype,
    need_values: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``topk(where(keep, logits (+ bias), fill), k, dim=-1)``.

    Args:
        logits: ``[..., N]`` float32 / float16 / bfloat16 scores (any strides).
        k: number of positions per row, ``0 <= k <= N``.
        row_starts, row_ends: optional int32/int64 ``[...]`` per-row bounds: positions
            ``row_starts <= j < row_ends`` are kept (DSA prefill ``ks``/``ke``).
        mask: optional bool ``[..., N]`` (broadcastable); ``mask_keeps`` says whether True keeps.
        bias: optional additive float mask ``[..., N]`` (0 / -inf or finfo.min), added first.
        fill: value of masked positions (``-inf`` for masked_fill), rounded to the result dtype.
        sorted: order each row by value, descending, as ``torch.topk(sorted=True)``.
        index_dtype: torch.int64 or torch.int32 for ``indices``.
        need_values: when False, ``values`` is an empty ``[..., 0]`` tensor and is never written.

    Returns:
        ``(values [..., k] in the result dtype, indices [..., k] index_dtype)``.

    Raises:
        ValueError / TypeError naming the argument: bad rank, dtype or device, ``k < 0`` or ``k > N``.
    """
    if logits.device.type != "cuda":  # (on CUDA, the *_triton function checks them)
        _check_args(logits, k, row_starts, row_ends, mask, bias, index_dtype)
        return masked_topk_reference(logits, k, row_starts, row_ends, mask, mask_keeps, bias, fill, sorted,
                                     index_dtype, need_values)
    values, indices = masked_topk_triton(logits, k, row_starts, row_ends, mask, mask_keeps, bias, fill, sorted,
                                         index_dtype, need_values)
    if VERIFY:
        why = topk_mismatch(masked_logits(logits, row_starts, row_ends, mask, mask_keeps, bias, fill), k,
                            values, indices, sorted, need_values)
        if why is not None:
            raise AssertionError(f"dsa_inductor verify: rule mask_topk ({OP_NAME}) differs from eager: {why}")
    return values, indices


@masked_topk.register_fake
def _masked_topk_fake(logits, k, row_starts, row_ends, mask, mask_keeps, bias, fill, sorted, index_dtype,
                      need_values):
    # Shapes only.  (Running the op body on fake tensors would work too, but its launch arithmetic on sizes, such as
    # next_power_of_2(N), would specialize dynamic shapes and recompile per size.)
    _check_args(logits, k, row_starts, row_ends, mask, bias, index_dtype)
    batch = _batch_shape(logits, row_starts, row_ends, mask, bias)
    values = logits.new_empty(*batch, k if need_values else 0, dtype=_result_dtype(logits, bias))
    return values, logits.new_empty(*batch, k, dtype=index_dtype)
