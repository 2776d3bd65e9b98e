"""``dsa_inductor::index_score``: the DSA indexer's score, never materializing ``[B, S, H, T]``.

Idiom (transformers' ``DeepseekV32Indexer.forward``; DeepSeek-V3.2 ``Indexer``, arXiv 2512.02556)::

    scores = torch.matmul(q.float(), k.transpose(-1, -2).float().unsqueeze(1)) * softmax_scale  # [B,S,H,T]
    scores = F.relu(scores)
    index_scores = torch.matmul(weights.unsqueeze(-2), scores).squeeze(-2)                     # [B,S,T]

Semantics (``q [B, S, H, D]``, ``k [B, T, D]`` (or ``[1, T, D]``), ``weights [B, S, H]``)::

    x[b,s,h,t] = q[b,s,h,:].float() . k[b,t,:].float()                  (fp32)
    y          = relu(x * scale)   if not scale_after_relu  else  relu(x) * scale
    out[b,s,t] = sum_h weights[b,s,h].float() * y[b,s,h,t]               (fp32, [B, S, T])

and with ``row_ends [B, S]``: ``out[b,s,t] = -inf`` for ``t >= row_ends[b,s]`` (the causal / range mask
that follows in the indexer, as ``masked_fill(~keep, -inf)`` writes it).  Tiles entirely past a row
tile's largest end are written as ``-inf`` without reading q or k.

Rounding: bf16/fp16 products are exact in fp32, so the only differences with eager are the order of the
fp32 sums over ``D`` and ``H`` (the scale, the relu and the weight are applied per element in eager's
order).  Tolerance (``tolerance()``):
``|ours - eager| <= (D + H + 8) * 2**-24 * M`` elementwise, where ``M`` is this op on ``|q|, |k|,
|weights|, |scale|`` (the standard bound for fp32 sums of products).  NaN and inf propagate as in eager.

CUDA path (``index_score_triton``): one program per ``BLOCK_S`` query rows x ``BLOCK_T`` keys of one batch;
``k^T [D, BLOCK_T]`` is loaded once, then for each head ``tl.dot(q_h [BLOCK_S, D], k^T)`` (fp32
accumulation; fp32 inputs with ``input_precision="ieee"``, as eager's fp32 matmul without TF32), relu,
times the head's weight, summed into an fp32 ``[BLOCK_S, BLOCK_T]`` register tile.  Programs of one row tile
are adjacent so its q rows are read from L2 by every key tile.

CPU path: plain torch, exactly transformers' spelling (Inductor compiles it to C++ when traced).
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
from torch.library import triton_op, wrap_triton

try:  # triton is optional on CPU-only installs; the CPU path never needs it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None

OP_NAME = "dsa_inductor::index_score"
VERIFY = False  # set by register_dsa_passes(verify=True): check each CUDA call against eager

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check_args(q, k, weights, scale, row_ends):
    """Raise ValueError/TypeError naming the offending argument."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"index_score: `q` must be a [B, S, H, D] tensor, got {getattr(q, 'shape', type(q))}")
    if q.dtype not in _FLOATS:
        raise TypeError(f"index_score: `q` must be float32, float16 or bfloat16, got {q.dtype}")
    if not isinstance(k, torch.Tensor) or k.dim() != 3:
        raise ValueError(f"index_score: `k` must be a [B, T, D] tensor, got {getattr(k, 'shape', type(k))}")
    if k.dtype != q.dtype:
        raise TypeError(f"index_score: `k` must have the dtype of `q` ({q.dtype}), got {k.dtype}")
    if not isinstance(weights, torch.Tensor) or weights.dim() != 3:
        raise ValueError(f"index_score: `weights` must be a [B, S, H] tensor, got "
                         f"{getattr(weights, 'shape', type(weights))}")
    if weights.dtype not in _FLOATS:
        raise TypeError(f"index_score: `weights` must be float32, float16 or bfloat16, got {weights.dtype}")
    for name, t in (("k", k), ("weights", weights), ("row_ends", row_ends)):
        if t is not None and t.device != q.device:
            raise ValueError(f"index_score: `{name}` is on {t.device}, `q` on {q.device}")
    b, s, h, d = q.shape
    torch._check_value(k.shape[-1] == d, lambda: f"index_score: `k` has head dim {k.shape[-1]}, `q` has {d}")
    torch._check_value(k.shape[0] == b or k.shape[0] == 1,
                       lambda: f"index_score: `k` has batch {k.shape[0]}, `q` has {b} (or 1 to broadcast)")
    torch._check_value(weights.shape[0] == b and weights.shape[1] == s and weights.shape[2] == h,
                       lambda: f"index_score: `weights` has shape {tuple(weights.shape)}, expected [B, S, H] = "
                               f"{(b, s, h)}")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"index_score: `scale` must be a finite number, got {scale!r}")
    if row_ends is not None:
        if row_ends.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"index_score: `row_ends` must be int32 or int64, got {row_ends.dtype}")
        torch._check_value(row_ends.dim() == 2 and row_ends.shape[0] == b and row_ends.shape[1] == s,
                           lambda: f"index_score: `row_ends` has shape {tuple(row_ends.shape)}, expected [B, S] = "
                                   f"{(b, s)}")


def index_score_reference(q, k, weights, scale=1.0, scale_after_relu=False, row_ends=None):
    """Plain-torch definition of the op, spelled as transformers spells it (the CPU path and test oracle)."""
    x = torch.matmul(q.float(), k.transpose(-1, -2).float().unsqueeze(1))
    y = torch.relu(x) * scale if scale_after_relu else torch.relu(x * scale)
    out = torch.matmul(weights.float().unsqueeze(-2), y).squeeze(-2)
    if row_ends is not None:
        pos = torch.arange(out.shape[-1], device=out.device)
        out = out.masked_fill(pos >= row_ends.unsqueeze(-1), float("-inf"))
    return out


def tolerance(q, k, weights, scale=1.0, row_ends=None):
    """Elementwise bound on ``|ours - eager|``: ``(D + H + 8) * 2**-24 * M`` (see the module docstring)."""
    # Non-finite inputs give a non-finite result (compared exactly) or an exact 0 after the relu: they
    # take no part in the rounding bound.
    def fin(x):
        return torch.where(torch.isfinite(x), x.abs(), 0).to(x.dtype)

    mag = index_score_reference(fin(q), fin(k), fin(weights), abs(scale), False, row_ends)
    mag = torch.where(torch.isfinite(mag), mag, 0.0)
    return (q.shape[-1] + q.shape[-2] + 8) * 2.0**-24 * mag


def score_mismatch(ours, ref, tol) -> Optional[str]:
    """Why ``ours`` is not ``ref`` within ``tol`` (None if it is); NaN and inf must agree exactly."""
    if tuple(ours.shape) != tuple(ref.shape):
        return f"shape {tuple(ours.shape)} != eager's {tuple(ref.shape)}"
    if ours.dtype != ref.dtype:
        return f"dtype {ours.dtype} != eager's {ref.dtype}"
    finite = torch.isfinite(ref)
    bad = torch.where(finite, ~((ours - ref).abs() <= tol), ~((ours == ref) | (ours.isnan() & ref.isnan())))
    if bad.any():
        idx = tuple(bad.nonzero()[0].tolist())
        return (f"element {idx}: {ours[idx].item()!r} vs eager {ref[idx].item()!r} "
                f"(tolerance {tol[idx].item():.3g})")
    return None


if triton is not None:

    @triton.jit
    def _index_score_kernel(
        q_ptr, qs0, qs1, qs2, qs3, k_ptr, ks0, ks1, ks2, w_ptr, ws0, ws1, ws2, e_ptr, es0, es1,
        o_ptr, os0, os1, os2,
        S, T, H, D, scale,
        SCALE_AFTER_RELU: tl.constexpr, HAS_ENDS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One (row tile, key tile) of one batch; key tiles of a row tile are adjacent programs."""
        pid = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        n_t = tl.cdiv(T, BLOCK_T)
        pid_s = pid // n_t
        pid_t = pid % n_t
        rs = (pid_s * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
        rt = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        rd = tl.arange(0, BLOCK_D)
        s_ok = rs < S
        t_ok = rt < T
        d_ok = rd < D
        out_ptrs = o_ptr + b * os0 + rs[:, None] * os1 + rt[None, :] * os2
        out_ok = s_ok[:, None] & t_ok[None, :]
        skip = pid_t < 0
        if HAS_ENDS:
            ends = tl.load(e_ptr + b * es0 + rs * es1, mask=s_ok, other=0).to(tl.int64)
            skip = pid_t * BLOCK_T >= tl.max(ends, 0)
        if skip:
            # Every position of the tile is past its row's end: eager's masked_fill writes -inf there.
            tl.store(out_ptrs, tl.full([BLOCK_S, BLOCK_T], float("-inf"), tl.float32), mask=out_ok)
        else:
            kt = tl.load(k_ptr + b * ks0 + rt[None, :] * ks1 + rd[:, None] * ks2,
                         mask=t_ok[None, :] & d_ok[:, None], other=0.0)
            if UPCAST:
                kt = kt.to(tl.float32)
            q_ptrs = q_ptr + b * qs0 + rs[:, None] * qs1 + rd[None, :] * qs3
            w_ptrs = w_ptr + b * ws0 + rs * ws1
            q_ok = s_ok[:, None] & d_ok[None, :]
            acc = tl.zeros([BLOCK_S, BLOCK_T], dtype=tl.float32)
            for h in range(H):
                qh = tl.load(q_ptrs + h * qs2, mask=q_ok, other=0.0)
                if UPCAST:
                    qh = qh.to(tl.float32)
                wh = tl.load(w_ptrs + h * ws2, mask=s_ok, other=0.0).to(tl.float32)
                if IEEE:
                    x = tl.dot(qh, kt, input_precision="ieee")
                else:
                    x = tl.dot(qh, kt)
                # The scale where eager applies it, per element (so inf * 0, overflow and NaN are eager's).
                if SCALE_AFTER_RELU:
                    y = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL) * scale
                else:
                    y = tl.maximum(x * scale, 0.0, propagate_nan=tl.PropagateNan.ALL)
                acc += y * wh[:, None]
            if HAS_ENDS:
                acc = tl.where(rt[None, :] < ends[:, None], acc, float("-inf"))
            tl.store(out_ptrs, acc, mask=out_ok)


def _default_config(q, t):
    """(BLOCK_S, BLOCK_T, num_warps, num_stages).  The [BLOCK_S, BLOCK_T] fp32 accumulator and one head's
    dot result live in registers together: 64 x 256 with 8 warps is 64 + 64 registers per thread.  A wide
    key tile makes each q row tile be read T / BLOCK_T times (from L2), so wide T tiles are preferred."""
    if q.dtype == torch.float32:
        return 32, 64, 4, 2
    return 64, 256 if t >= 256 else 128, 8, 3


def index_score_triton(q, k, weights, scale=1.0, scale_after_relu=False, row_ends=None, launch=None,
                       block_s=None, block_t=None, num_warps=None, num_stages=None):
    """Run the Triton kernel.  ``launch`` wraps the jitted kernel (``wrap_triton`` under the op); the
    block sizes and launch options override ``_default_config`` (tests shrink them, tuning sweeps them)."""
    if triton is None:
        raise RuntimeError("index_score: triton is not installed")
    _check_args(q, k, weights, scale, row_ends)
    b, s, h, d = q.shape
    t = k.shape[1]
    out = torch.empty(b, s, t, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    ds, dt, dw, dst = _default_config(q, t)
    block_s, block_t = block_s or ds, block_t or dt
    k = k.expand(b, t, d)
    e = row_ends if row_ends is not None else out
    # Triton 3.9's interpreter computes a bf16 tl.dot wrongly (values ~1e10 off): there the bf16 tiles are
    # upcast first, which is exact (bf16 -> fp32) and gives the same fp32 products.
    upcast = q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    kernel = _index_score_kernel if launch is None else launch(_index_score_kernel)
    grid = (triton.cdiv(s, block_s) * triton.cdiv(t, block_t), b)
    kernel[grid](
        q, *q.stride(), k, *k.stride(), weights, *weights.stride(), e, e.stride(0), e.stride(1),
        out, *out.stride(), s, t, h, d, float(scale),
        SCALE_AFTER_RELU=bool(scale_after_relu), HAS_ENDS=row_ends is not None, IEEE=q.dtype == torch.float32 or upcast, UPCAST=upcast,
        BLOCK_S=block_s, BLOCK_T=block_t, BLOCK_D=max(16, triton.next_power_of_2(d)),
        num_warps=num_warps or dw, num_stages=num_stages or dst)
    return out


@triton_op(OP_NAME, mutates_args=())
def index_score(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    scale: float,
    scale_after_relu: bool,
    row_ends: Optional[torch.Tensor],
) -> torch.Tensor:
    """Fused ``sum_h weights * relu(q . k * scale)`` over heads, as fp32 ``[B, S, T]``.

    Args:
        q: ``[B, S, H, D]`` float32 / float16 / bfloat16 queries (any strides).
        k: ``[B, T, D]`` (or ``[1, T, D]``) keys, the dtype of ``q``.
        weights: ``[B, S, H]`` float per-head weights (any float dtype above).
        scale: applied to each per-head dot product, before the relu (``scale_after_relu=False``, as
            transformers does) or after it.
        row_ends: optional int32/int64 ``[B, S]``: positions ``t >= row_ends[b, s]`` are ``-inf``.

    Returns:
        float32 ``[B, S, T]``.

    Raises:
        ValueError / TypeError naming the argument: bad rank, dtype, device or shape, non-finite scale.
    """
    _check_args(q, k, weights, scale, row_ends)
    if q.device.type != "cuda":
        return index_score_reference(q, k, weights, scale, scale_after_relu, row_ends)
    out = index_score_triton(q, k, weights, scale, scale_after_relu, row_ends, launch=wrap_triton)
    if VERIFY:
        ref = index_score_reference(q, k, weights, scale, scale_after_relu, row_ends)
        why = score_mismatch(out, ref, tolerance(q, k, weights, scale, row_ends))
        if why is not None:
            raise AssertionError(f"dsa_inductor verify: rule index_score ({OP_NAME}) differs from eager: {why}")
    return out


@index_score.register_fake
def _index_score_fake(q, k, weights, scale, scale_after_relu, row_ends):
    # Shapes only (the launch arithmetic on sizes would specialize dynamic shapes).
    _check_args(q, k, weights, scale, row_ends)
    return q.new_empty(q.shape[0], q.shape[1], k.shape[1], dtype=torch.float32)
