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


def _check(args, eager, ours):
    q, k, w = args
    return score_mismatch(ours, eager, tolerance(q, k, w, SCALE))


def cases(device="cuda"):
    b, s, t, h, d = 1, 4096, 4096, 64, 128

    def inputs():
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(b, s, h, d, device=device, generator=g).bfloat16()
        k = torch.randn(b, t, d, device=device, generator=g).bfloat16()
        w = torch.randn(b, s, h, device=device, generator=g) * h ** -0.5
        return q, k, w

    return [
        Case("index_score (transformers matmul form)", f"B={b} S=T={s} H={h} D={d} bf16", transformers_index_score,
             inputs, min_bytes=(b * s * h * d + b * t * d) * 2 + b * s * h * 4 + b * s * t * 4,
             flops=2.0 * b * s * t * h * d, check=_check),
    ]
