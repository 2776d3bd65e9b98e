"""mask-then-topk at DeepSeek-V3.2 indexer shapes (index_topk = 2048).

Eager functions are written the way model code writes them: the DSA prefill range form (``ks``/``ke``
per query row), the transformers ``DeepseekV32Indexer`` bool-mask form, and decode rows.
"""

from __future__ import annotations

import torch

from dsa_inductor.lowerings.masked_topk import masked_logits, topk_mismatch
from harness import Case


def indexer_range_topk(logits, row_starts, row_ends, k: int):
    pos = torch.arange(logits.shape[-1], device=logits.device)
    keep = (pos[None, :] >= row_starts[:, None]) & (pos[None, :] < row_ends[:, None])
    logits = logits.masked_fill(~keep, float("-inf"))
    return logits.topk(min(k, logits.shape[-1]), dim=-1).indices.to(torch.int32)


def indexer_bool_mask_topk(index_scores, attention_mask, k: int):
    index_scores = index_scores.masked_fill(~attention_mask, float("-inf"))
    return index_scores.topk(min(k, index_scores.shape[-1]), dim=-1).indices.to(torch.int32)


def indexer_topk_to_mask(index_scores, attention_mask, k: int):
    # transformers DeepseekV32Attention: the indexer's selection becomes a boolean mask by scatter, so the
    # order of the indices is unobservable and dsa_inductor drops the sort.
    topk = indexer_bool_mask_topk(index_scores, attention_mask, k)
    return torch.ones_like(attention_mask).scatter(-1, topk.long(), False)


def _check_scatter(args, eager, ours):
    return None if torch.equal(eager, ours) else "selection mask differs from eager"


def _check_range(args, eager, ours):
    logits, starts, ends, k = args
    masked = masked_logits(logits, row_starts=starts, row_ends=ends)
    return topk_mismatch(masked, ours.shape[-1], None, ours, sorted=True, need_values=False)


def _check_mask(args, eager, ours):
    scores, mask, k = args
    return topk_mismatch(masked_logits(scores, mask=mask), ours.shape[-1], None, ours, True, False)


def cases(device="cuda"):
    k = 2048

    def causal_inputs(t=8192):
        g = torch.Generator(device=device).manual_seed(0)
        logits = torch.randn(t, t, device=device, generator=g)
        return logits, torch.zeros(t, dtype=torch.int32, device=device), \
            torch.arange(1, t + 1, dtype=torch.int32, device=device), k

    def decode_inputs(rows=64, n=65536):
        g = torch.Generator(device=device).manual_seed(1)
        logits = torch.randn(rows, n, device=device, generator=g)
        ends = torch.randint(n // 2, n + 1, (rows,), device=device, generator=g, dtype=torch.int32)
        return logits, torch.zeros(rows, dtype=torch.int32, device=device), ends, k

    def bool_inputs(t=8192):
        g = torch.Generator(device=device).manual_seed(2)
        scores = torch.randn(1, t, t, device=device, generator=g)
        mask = torch.ones(t, t, dtype=torch.bool, device=device).tril()[None]
        return scores, mask, k

    t, rows, n = 8192, 64, 65536
    causal_bytes = (t * (t + 1) / 2) * 4 + t * k * 4
    return [
        Case("mask_topk (range rows, causal)", f"logits {t}x{t} fp32, k={k}", indexer_range_topk, causal_inputs,
             min_bytes=causal_bytes, check=_check_range),
        Case("mask_topk (range rows, decode)", f"logits {rows}x{n} fp32, k={k}", indexer_range_topk, decode_inputs,
             min_bytes=rows * n * 0.75 * 4 + rows * k * 4, check=_check_range),
        Case("mask_topk (bool mask, transformers)", f"scores 1x{t}x{t} fp32, k={k}", indexer_bool_mask_topk,
             bool_inputs, min_bytes=causal_bytes + t * t, check=_check_mask),
        Case("mask_topk -> scatter mask (transformers)", f"scores 1x{t}x{t} fp32, k={k}", indexer_topk_to_mask,
             bool_inputs, min_bytes=causal_bytes + 2 * t * t, check=_check_scatter),
    ]
