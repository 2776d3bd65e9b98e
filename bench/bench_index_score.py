"""Index score at DeepSeek-V3.2 indexer shapes (64 heads, head dim 128), bf16 q/k, fp32 weights.

The eager function is transformers' ``DeepseekV32Indexer.forward`` spelling: it materializes the
[B, S, H, T] fp32 scores (4 GB at S = T = 4096) and a [B, S, D, T] fp32 copy of k for the broadcast matmul.
The roofline is the FLOP one (2 * B * S * T * H * D at the bf16 dense peak).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsa_inductor.lowerings.index_score import score_mismatch, tolerance
from harness import Case

SCALE = 128 ** -0.5


def transformers_index_score(q, k, weights):
    scores = torch.matmul(q.float(), k.transpose(-1, -2).float().unsqueeze(1)) * SCALE
    scores = F.relu(scores)
    return torch.matmul(weights.unsqueeze(-2), scores).squeeze(-2)


K = 2048


def causal_index_topk(q, k, weights):
    """The indexer chain as transformers writes it: score, causal bool mask from aranges, top-k indices."""
    s, t = q.shape[1], k.shape[1]
    q_idx = torch.arange(s, device=q.device) + (t - s)
    kv_idx = torch.arange(t, device=q.device)
    mask = (kv_idx[None, None, None, :] <= q_idx[None, None, :, None]).expand(q.shape[0], 1, s, t)[:, 0]
    scores = transformers_index_score(q, k, weights).masked_fill(~mask, float("-inf"))
    return scores.topk(min(K, t), dim=-1).indices.to(torch.int32)


def _check_chain(args, eager, ours):
    from dsa_inductor.lowerings.index_score import index_score_reference

    q, k, w = args
    s, t = q.shape[1], k.shape[1]
    ends = (torch.arange(s, device=q.device) + (t - s) + 1)[None].expand(q.shape[0], s)
    masked = index_score_reference(q[:, :512], k, w[:, :512], SCALE, False, ends[:, :512])
    idx = ours[:, :512].long()
    picked = masked.gather(-1, idx).sort(-1, descending=True).values
    ref = masked.topk(idx.shape[-1], -1).values
    if not torch.equal(torch.isfinite(picked), torch.isfinite(ref)):
        return "a masked position selected where an in-range one should be"
    fin = torch.isfinite(ref)
    err = (picked - ref).abs()[fin].max().item() if fin.any() else 0.0
    return None if err <= 1e-3 * ref[fin].abs().max().item() else f"selected scores off by {err:.3g}"


def _check(args, eager, ours):
    q, k, w = args
    return score_mismatch(ours, eager, tolerance(q, k, w, SCALE))


FP8 = torch.float8_e4m3fn


def fp8_cache_index_score(q, weights, k_cache, k_scale, slots):
    """Serving form: the keys read from the FP8 indexer cache by slot (DeepSeek-V3.2's FP8 ``k_cache`` with a
    per-token fp32 scale; padding slots -1), dequantized, then transformers' score on bf16 q."""
    idx = slots.clamp(min=0)
    k = k_cache[idx].view(FP8).float() * k_scale[idx].unsqueeze(-1)
    k = torch.where((slots < 0).unsqueeze(-1), 0.0, k).unsqueeze(0)
    return transformers_index_score(q, k, weights)


def _check_fp8_cache(args, eager, ours):
    from dsa_inductor.lowerings.index_score import gathered_k

    q, w, cache, k_scale, slots = args
    k = gathered_k(cache, slots[None], k_scale[:, None], 0, True)
    return score_mismatch(ours, eager, tolerance(q, k, w, SCALE))


def fp8_cache_decode_index_score(q, weights, k_cache, k_scale, slots):
    """Decode form: one query row per request, each request's keys read from the FP8 indexer cache through its
    own slot row (``slots [B, T]``, padding -1), dequantized, then transformers' score."""
    idx = slots.clamp(min=0)
    k = k_cache[idx].view(FP8).float() * k_scale[idx].unsqueeze(-1)
    k = torch.where((slots < 0).unsqueeze(-1), 0.0, k)
    return transformers_index_score(q, k, weights)


def _check_fp8_decode(args, eager, ours):
    from dsa_inductor.lowerings.index_score import gathered_k

    q, w, cache, k_scale, slots = args
    k = gathered_k(cache, slots, k_scale[:, None], 0, True)
    return score_mismatch(ours, eager, tolerance(q, k, w, SCALE))


def cases(device="cuda"):
    b, s, t, h, d = 1, 4096, 4096, 64, 128
    bd, td = 64, 16384  # decode: 64 requests of one query row over 16384 keys each

    def decode_inputs():
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(bd, 1, h, d, device=device, generator=g).bfloat16()
        k = torch.randn(bd, td, d, device=device, generator=g).bfloat16()
        w = torch.randn(bd, 1, h, device=device, generator=g) * h ** -0.5
        return q, k, w

    def fp8_decode_inputs():
        from dsa_inductor.lowerings.gather_dequant import quantize_e4m3

        g = torch.Generator(device=device).manual_seed(0)
        n = bd * td
        q = torch.randn(bd, 1, h, d, device=device, generator=g).bfloat16()
        w = torch.randn(bd, 1, h, device=device, generator=g) * h ** -0.5
        cache, scale = quantize_e4m3(torch.randn(n, d, device=device, generator=g))
        slots = torch.randperm(n, device=device, generator=g).view(bd, td)
        slots[:, -97:] = -1  # padding at the end of each request's row
        return q, w, cache, scale.view(n), slots

    def inputs():
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(b, s, h, d, device=device, generator=g).bfloat16()
        k = torch.randn(b, t, d, device=device, generator=g).bfloat16()
        w = torch.randn(b, s, h, device=device, generator=g) * h ** -0.5
        return q, k, w

    s8, t8, n8 = 1024, 4096, 16384

    def fp8_inputs():
        from dsa_inductor.lowerings.gather_dequant import quantize_e4m3

        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(b, s8, h, d, device=device, generator=g).bfloat16()
        w = torch.randn(b, s8, h, device=device, generator=g) * h ** -0.5
        cache, scale = quantize_e4m3(torch.randn(n8, d, device=device, generator=g))
        slots = torch.randperm(n8, device=device, generator=g)[:t8]
        slots[::97] = -1
        return q, w, cache, scale.view(n8), slots

    decode_bytes = bd * td * d * 2 + bd * td * 4 + bd * h * (d * 2 + 4)
    return [
        # Decode: one query row per request, so the score is a stream over the keys (the HBM roofline); a tile of
        # query rows would hold one real row, and the heads layout puts the 64 heads on the dot's rows instead.
        Case("index_score (decode, transformers matmul form)", f"B={bd} S=1 T={td} H={h} D={d} bf16",
             transformers_index_score, decode_inputs, min_bytes=decode_bytes, flops=2.0 * bd * td * h * d,
             check=_check),
        Case("index_score (decode) from the FP8 cache (gather_dequant folded)", f"B={bd} S=1 T={td} H={h} D={d} "
             f"bf16 q, FP8 cache, per-request slots", fp8_cache_decode_index_score, fp8_decode_inputs,
             min_bytes=bd * td * (d + 4 + 8 + 4), flops=2.0 * bd * td * h * d, check=_check_fp8_decode),
        # fp32 dots (eager's q.float() @ dequantized fp32 k): the roofline column (the bf16 tensor-core peak) is
        # out of reach for them; what the fold removes is the [T, D] fp32 copy of the keys and its launch.
        Case("index_score from the FP8 cache (gather_dequant folded)", f"B={b} S={s8} T={t8} H={h} D={d} "
             f"bf16 q, FP8 cache of {n8} slots", fp8_cache_index_score, fp8_inputs,
             flops=2.0 * b * s8 * t8 * h * d, check=_check_fp8_cache),
        Case("index_score (transformers matmul form)", f"B={b} S=T={s} H={h} D={d} bf16", transformers_index_score,
             inputs, min_bytes=(b * s * h * d + b * t * d) * 2 + b * s * h * 4 + b * s * t * 4,
             flops=2.0 * b * s * t * h * d, check=_check),
        # Causal rows: the fused chain skips the key tiles past each row's end (about half the FLOPs) and
        # leaves them unwritten; top-k k = 2048 over the in-range part (sorted: the indices are returned).
        Case("index_score -> causal top-k (indexer chain)", f"B={b} S=T={s} H={h} D={d} k={K} bf16",
             causal_index_topk, inputs, flops=1.0 * b * s * t * h * d, check=_check_chain),
    ]
